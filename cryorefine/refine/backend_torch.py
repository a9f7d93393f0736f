"""The PyTorch backend (`--gpu`): the kernels of refine.backend on a CUDA device (or, for tests, the CPU).

Same functions and conventions as the CPU backend (refine.likelihood, fourier.kernels): trilinear slice
extraction and insertion on the padded half-cube, the coarse-pass products with the residual and the significance
threshold, the fine-pass products. Projections and back-projection sums stay on the device for a whole E-step
of a half (`finish` copies the sums back). Imported only when --gpu is given, so the package never needs torch
otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cryorefine.fourier import backprojector as bpm
from cryorefine.fourier import projector as pjm
from cryorefine.fourier.kernels import half_cube_radius

_MAX_POINTS = 1 << 24        # sample points per chunk of slice extraction / insertion (bounds temporary memory)
_LOG_CUTOFF = -88.0          # log-weights this far below the maximum count as 0 (as weights.significance_threshold)


def pad_y(rot: torch.Tensor, u: torch.Tensor, v: torch.Tensor, pad: float) -> torch.Tensor:
    """The y coordinate pad·(Aᵀ(u, v, 0))_y before folding and offset, (n, m) float64."""
    a = pad * rot
    return u[None, :] * a[:, 0, 1, None] + v[None, :] * a[:, 1, 1, None]


@dataclass
class DeviceProjector:
    """A Projector whose half-cube also lives on the device."""

    host: pjm.Projector
    ft3d: torch.Tensor

    @property
    def pad(self) -> int:
        """Padding factor."""
        return self.host.pad

    @property
    def r_max(self) -> float:
        """Radius (N-box Fourier px) beyond which samples are 0."""
        return self.host.r_max


def cuda_devices() -> int:
    """Number of CUDA devices PyTorch sees."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pick_device(gpu: str, rank: int = 0) -> torch.device:
    """RELION's --gpu: "" = the rank-th visible GPU (round robin); "0:1" = one ':'-separated group per rank (rank r
    takes group r mod the number of groups), "0,1:2,3" = groups of several GPUs, of which a rank uses the first;
    "cpu" runs the same kernels on the CPU (tests)."""
    if gpu.strip().lower() == "cpu":
        return torch.device("cpu")
    n = cuda_devices()
    if n == 0:
        raise ValueError("no CUDA device is visible to PyTorch")
    groups = [g for g in gpu.split(":") if g.strip()]
    if groups:
        first = groups[rank % len(groups)].split(",")[0].strip()
        if not first.isdigit():
            raise ValueError(f"{first!r} is not a GPU number")
        idx = int(first)
    else:
        idx = rank % n
    if not 0 <= idx < n:
        raise ValueError(f"GPU {idx} does not exist ({n} visible)")
    return torch.device(f"cuda:{idx}")


class TorchKernels:
    """The hot kernels on one torch device; methods take and return numpy arrays."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pairs: tuple | None = None          # (host p_pair, host p_pow, device p_pair, device p_pow)
        self._sums: dict[int, tuple] = {}         # id(BackProjector) -> (bp, data re, data im, weight) on device
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False   # float32 products, as the CPU path

    def _t(self, a, dtype=None) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), device=self.device, dtype=dtype)

    # ---- slice extraction ----
    def make_projector(self, volume, pad: int = 2, r_max: float | None = None) -> DeviceProjector:
        """fourier.projector.make_projector, with the half-cube copied to the device."""
        host = pjm.make_projector(volume, pad=pad, r_max=r_max)
        return DeviceProjector(host, self._t(host.ft3d))

    def _coords(self, rot: torch.Tensor, u: torch.Tensor, v: torch.Tensor, pad: float, off: int):
        """Folded half-cube coordinates of pad·Aᵀ(u, v, 0): (neg, x, y, z), each (n, m) float64."""
        a = pad * rot              # as fourier.kernels: A scaled first, then u·a0c + v·a1c
        x = u[None, :] * a[:, 0, 0, None] + v[None, :] * a[:, 1, 0, None]
        y = u[None, :] * a[:, 0, 1, None] + v[None, :] * a[:, 1, 1, None]
        z = u[None, :] * a[:, 0, 2, None] + v[None, :] * a[:, 1, 2, None]
        neg = x < 0
        sign = torch.where(neg, -1.0, 1.0).to(x.dtype)
        return neg, x * sign, y * sign + off, z * sign + off

    def project(self, proj: DeviceProjector, rotations, kx, ky, out: np.ndarray | None = None) -> np.ndarray:
        """Trilinear central-slice samples V̂(Aᵀ(kx, ky, 0)) -> (n, m) complex64 (into `out` when given); 0 beyond
        r_max."""
        rot = self._t(np.asarray(rotations, np.float64).reshape(-1, 3, 3))
        u = self._t(np.asarray(kx, np.float32).ravel()).double()
        v = self._t(np.asarray(ky, np.float32).ravel()).double()
        ft = proj.ft3d
        d, _, h = ft.shape
        radius = half_cube_radius(tuple(ft.shape))
        r_max = min(float(proj.r_max), radius / proj.pad)
        inside = (u * u + v * v <= r_max * r_max)[None, :]
        flat = ft.reshape(-1)
        res = torch.empty((rot.shape[0], u.shape[0]), dtype=torch.complex64, device=self.device)
        step = max(1, _MAX_POINTS // max(1, u.shape[0]))
        for s in range(0, rot.shape[0], step):
            neg, x, y, z = self._coords(rot[s:s + step], u, v, float(proj.pad), (d - 1) // 2)
            x0, y0, z0 = x.floor(), y.floor(), z.floor()
            fx, fy, fz = (x - x0).float(), (y - y0).float(), (z - z0).float()
            ok = inside.expand_as(x)
            x0 = torch.where(ok, x0, 0).long()
            y0 = torch.where(ok, y0, 0).long()
            z0 = torch.where(ok, z0, 0).long()
            base = (z0 * d + y0) * h + x0

            def at(dz, dy, dx):
                return flat[base + (dz * d + dy) * h + dx]

            gx, gy = 1 - fx, 1 - fy
            c0 = (at(0, 0, 0) * gx + at(0, 0, 1) * fx) * gy + (at(0, 1, 0) * gx + at(0, 1, 1) * fx) * fy
            c1 = (at(1, 0, 0) * gx + at(1, 0, 1) * fx) * gy + (at(1, 1, 0) * gx + at(1, 1, 1) * fx) * fy
            val = c0 * (1 - fz) + c1 * fz
            val = torch.where(neg, val.conj(), val)
            res[s:s + step] = torch.where(ok, val, torch.zeros((), dtype=val.dtype, device=self.device))
        if out is None:
            return res.cpu().numpy()
        out[...] = res.cpu().numpy()
        return out

    # ---- insertion ----
    def insert(self, bp: bpm.BackProjector, rotations, kx, ky, values, weights) -> None:
        """Trilinear splat into device copies of bp's sums (atomic adds); `finish(bp)` brings them back."""
        key = id(bp)
        if key not in self._sums:
            zeros = torch.zeros(bp.weight.size, dtype=torch.float32, device=self.device)
            self._sums[key] = (bp, zeros, zeros.clone(), zeros.clone())
        _, dre, dim, wsum = self._sums[key]
        rot = self._t(np.asarray(rotations, np.float64).reshape(-1, 3, 3))
        u = self._t(np.asarray(kx, np.float32).ravel()).double()
        v = self._t(np.asarray(ky, np.float32).ravel()).double()
        vals = self._t(np.broadcast_to(values, (rot.shape[0], u.shape[0])).astype(np.complex64))
        wts = self._t(np.broadcast_to(weights, (rot.shape[0], u.shape[0])).astype(np.float32))
        d, _, h = bp.data.shape
        radius = half_cube_radius(bp.data.shape)
        r_ins = min(int(round(bp.pad * bp.r_max)), radius)
        step = max(1, _MAX_POINTS // max(1, u.shape[0]))
        off = (d - 1) // 2
        for s in range(0, rot.shape[0], step):
            neg, x, y, z = self._coords(rot[s:s + step], u, v, float(bp.pad), off)
            # the same arithmetic as fourier.kernels (y before its offset, z after): points on the sphere
            # |ξ| = r_ins are kept or dropped alike
            yc = torch.where(neg, -1.0, 1.0).to(x.dtype) * pad_y(rot[s:s + step], u, v, float(bp.pad))
            ok = x * x + (yc * yc + (z - off) * (z - off)) <= r_ins * r_ins
            val = torch.where(neg, vals[s:s + step].conj(), vals[s:s + step])[ok]
            w = wts[s:s + step][ok]
            x, y, z = x[ok], y[ok], z[ok]
            x0, y0, z0 = x.floor(), y.floor(), z.floor()
            fx, fy, fz = (x - x0).float(), (y - y0).float(), (z - z0).float()
            base = (z0.long() * d + y0.long()) * h + x0.long()
            for dz, wz in ((0, 1 - fz), (1, fz)):
                for dy, wy in ((0, 1 - fy), (1, fy)):
                    for dx, wx in ((0, 1 - fx), (1, fx)):
                        c = wz * wy * wx
                        idx = base + (dz * d + dy) * h + dx
                        dre.index_add_(0, idx, val.real * c)
                        dim.index_add_(0, idx, val.imag * c)
                        wsum.index_add_(0, idx, w * c)

    def finish(self, bp: bpm.BackProjector) -> None:
        """Add the device sums of bp into its host arrays and free them (end of a half's E-step)."""
        entry = self._sums.pop(id(bp), None)
        if entry is None:
            return
        _, dre, dim, wsum = entry
        shape = bp.data.shape
        bp.data += (dre.cpu().numpy() + 1j * dim.cpu().numpy()).reshape(shape).astype(bp.data.dtype)
        bp.weight += wsum.cpu().numpy().reshape(shape).astype(bp.weight.dtype)

    # ---- likelihood ----
    def _projection_pairs(self, p_pair, p_pow) -> tuple[torch.Tensor, torch.Tensor]:
        """Device copies of the coarse projections, kept while the host arrays are the same objects."""
        if self._pairs is None or self._pairs[0] is not p_pair or self._pairs[1] is not p_pow:
            self._pairs = (p_pair, p_pow, self._t(p_pair), self._t(p_pow))
        return self._pairs[2], self._pairs[3]

    @staticmethod
    def _residual(cross: torch.Tensor, norm: torch.Tensor, cc_mode: bool) -> torch.Tensor:
        """fine_kernels.residual_value on tensors."""
        if cc_mode:
            return -cross / torch.sqrt(torch.clamp(norm, min=1e-30))
        return 0.5 * norm - cross

    def coarse_significant(self, a, p_pair, norm_w, p_pow, lp_off, lp_dir, cc_mode: bool, fraction: float,
                           maxsig: int) -> tuple[np.ndarray, np.ndarray]:
        """likelihood.coarse_significant: products, residuals and significance of a batch on the device."""
        pp, ppow = self._projection_pairs(p_pair, p_pow)
        at = self._t(a)
        nb, nt, m2 = at.shape
        cross = (at.reshape(nb * nt, m2) @ pp.T).reshape(nb, nt, -1)
        norm = self._t(norm_w) @ ppow.T
        d = self._residual(cross.double(), norm.double()[:, None, :], cc_mode).reshape(nb, -1)
        if cc_mode:
            keep = torch.zeros_like(d, dtype=torch.bool)
            keep[torch.arange(nb, device=self.device), torch.argmin(d, dim=1)] = True
            return keep.reshape(nb, nt, -1).cpu().numpy(), np.ones(nb, np.int64)
        lw = (-(d - d.min(dim=1, keepdim=True).values).double()
              + (self._t(lp_off, torch.float64)[:, :, None] + self._t(lp_dir, torch.float64)[None, None, :])
              .reshape(nb, -1))
        keep, count = self._significant(lw, fraction, maxsig)
        return keep.reshape(nb, nt, -1).cpu().numpy(), count.cpu().numpy()

    @staticmethod
    def _significant(lw: torch.Tensor, fraction: float, maxsig: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: keep the largest weights exp(lw) whose running sum first exceeds fraction of the total (at most
        maxsig when > 0); -inf entries are never kept (weights.significance_threshold)."""
        vals, _ = torch.sort(lw, dim=1, descending=True)
        rel = vals - vals[:, :1]
        w = torch.where(rel > _LOG_CUTOFF, torch.exp(rel), torch.zeros((), dtype=rel.dtype, device=rel.device))
        cs = torch.cumsum(w, dim=1)
        target = (fraction * cs[:, -1:]).contiguous()
        k = torch.searchsorted(cs.contiguous(), target, right=True)[:, 0]
        count = torch.clamp(k + 1, max=lw.shape[1])
        if maxsig > 0:
            count = torch.clamp(count, max=maxsig)
        thr = vals.gather(1, (count - 1)[:, None])
        return lw >= thr, count

    def block_scores(self, xw, wn, ph, p, layout, cc_mode: bool) -> np.ndarray:
        """likelihood.block_scores on the device: each block's shifted images and projections gathered, one batched
        product per chunk of blocks."""
        xt, wt, pht, pt = (self._t(np.asarray(v, np.float32)) for v in (xw, wn, ph, p))
        xc = torch.view_as_complex(xt.reshape(xt.shape[0], -1, 2))           # interleaved pairs -> complex
        phc = torch.view_as_complex(pht.reshape(pht.shape[0], -1, 2))
        m = wt.shape[1]
        n_a, n_b = layout.n_a, layout.n_b
        img, ph_row, p_row = (self._t(v, torch.long) for v in (layout.img, layout.ph_row, layout.p_row))
        ra = torch.arange(n_a, device=self.device)
        rb = torch.arange(n_b, device=self.device)
        out = torch.empty((len(layout.img), n_a, n_b), dtype=torch.float64, device=self.device)
        step = max(1, _MAX_POINTS // max(1, (n_a + n_b) * 2 * m))
        for s in range(0, len(layout.img), step):
            sl = slice(s, s + step)
            shifted = xc[img[sl]][:, None, :] * phc[ph_row[sl][:, None] + ra]     # (k, n_a, m) complex
            shifted = torch.view_as_real(shifted).reshape(shifted.shape[0], n_a, 2 * m)
            pp = pt[p_row[sl][:, None] + rb]                              # (k, n_b, 2m)
            cross = torch.bmm(shifted, pp.transpose(1, 2))
            norm = (wt[img[sl]][:, None, :] * (pp[..., 0::2] ** 2 + pp[..., 1::2] ** 2)).sum(-1)
            out[sl] = self._residual(cross, norm[:, None, :], cc_mode).double()
        return out.cpu().numpy()

    def memory_note(self) -> str:
        """The device's peak memory so far (the log's last line reports it)."""
        if self.device.type != "cuda":
            return ""
        return f"GPU memory peak: {torch.cuda.max_memory_allocated(self.device) / 2 ** 30:.2f} GiB"


def torch_backend(gpu: str, rank: int = 0):
    """The Backend of refine.backend with these kernels on the device --gpu names."""
    from cryorefine.refine.backend import Backend
    dev = pick_device(gpu, rank)
    k = TorchKernels(dev)
    name = f"PyTorch {torch.__version__} on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}"
    return Backend(name, k.make_projector, k.project, k.insert, k.coarse_significant, k.block_scores, k.finish,
                   k.memory_note, reads_rows_in_place=False)
