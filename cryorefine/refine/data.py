"""The particles of a refinement: metadata arrays, optics groups, half-sets, and per-batch image preparation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from cryorefine.errors import InputError
from cryorefine.fourier.aberrations import OpticsModel, model_ctf, with_ctf_switches
from cryorefine.fourier.ctf import CTF_REQUIRED_COLUMNS, CtfParams, ctf_params_from_table
from cryorefine.fourier.filters import coloured_noise, mask_particles
from cryorefine.fourier.transforms import rfft2_centered
from cryorefine.io.particles import ParticleImages
from cryorefine.io.star import ParticleTable, optics_models, particle_optics, read_particles
from cryorefine.validate import check_half_sets


@dataclass(frozen=True)
class OpticsGroup:
    """One optics group as the refinement sees it."""

    number: int          # rlnOpticsGroup
    box: int             # N_o
    angpix: float        # p_o
    model_scale: float   # (N p)/(N_o p_o)
    model: OpticsModel | None = None   # aberrations, premultiplied / phase-flipped flags (fourier.aberrations)

    @property
    def optics_model(self) -> OpticsModel:
        """The group's OpticsModel (an aberration-free one when none was read)."""
        return self.model if self.model is not None else OpticsModel(self.box, self.angpix)

    @property
    def mag(self) -> tuple[float, float, float, float]:
        """(M00, M01, M10, M11) of the group's magnification matrix (identity without rlnMagMat)."""
        return self.optics_model.mag


@dataclass
class ParticleData:
    """Particle metadata in arrays, row i = row i of table.particles."""

    table: ParticleTable
    images: ParticleImages
    optics: list[OpticsGroup]
    optics_index: NDArray[np.int64]     # 0-based into `optics`
    ctf: CtfParams
    group: NDArray[np.int64]            # 0-based group (micrograph or rlnGroupName)
    group_names: list[str]
    subset: NDArray[np.int64]           # 1 or 2
    model_box: int = 0                  # N of the model grid (the first optics group's, as RELION's)
    model_angpix: float = 0.0           # p of the model grid (Å)

    @property
    def n(self) -> int:
        """Number of particles."""
        return len(self.subset)


def column(table: ParticleTable, label: str, default: float) -> NDArray[np.float64]:
    """A numeric particle column as float64, or `default` everywhere when the column is absent."""
    df = table.particles
    if label in df.columns:
        return df[label].to_numpy(dtype=np.float64)
    return np.full(len(df), default, dtype=np.float64)


def load_particles(path: str, model_box: int | None, model_angpix: float | None, seed: int,
                   need_ctf: bool, angpix: float | None = None, ctf_switches: dict[str, bool] | None = None
                   ) -> ParticleData:
    """Read a particle STAR file, check it, assign half-sets (spec §1.5) and groups (`angpix`: pixel size of a RELION
    3.0 file that gives none; `ctf_switches`: the keywords of fourier.aberrations.with_ctf_switches)."""
    table = read_particles(path, angpix=angpix)
    df = table.particles
    if len(df) == 0:
        raise InputError(f"{path}: the particle table is empty")
    if need_ctf:
        missing = [c for c in CTF_REQUIRED_COLUMNS if c not in df.columns]
        if missing:
            raise InputError(f"{path}: CTF correction (--ctf) needs column(s) {', '.join(missing)}")
    images = ParticleImages(table)
    opt_numbers = table.particles["rlnOpticsGroup"].to_numpy(np.int64) if "rlnOpticsGroup" in df.columns \
        else np.ones(len(df), np.int64)
    boxes = particle_optics(table, "rlnImageSize").astype(np.int64)
    pix = particle_optics(table, "rlnImagePixelSize").astype(np.float64)
    uniq = sorted(set(opt_numbers.tolist()))
    first = {o: int(np.nonzero(opt_numbers == o)[0][0]) for o in uniq}
    # the model grid is the optics table's first row's, whether particles use it or not, as RELION's (ml_model.cpp
    # getOpticsPixelSize(0), getOpticsImageSize(0); selections keep unused groups) and reconstruct's
    if model_box is not None:
        n0, p0 = model_box, model_angpix
    elif {"rlnImageSize", "rlnImagePixelSize"} <= set(table.optics.columns):
        n0, p0 = int(table.optics["rlnImageSize"].iloc[0]), float(table.optics["rlnImagePixelSize"].iloc[0])
    else:       # sizes given per particle (a RELION 3.0 file): the first particle's
        n0, p0 = int(boxes[0]), float(pix[0])
    optics = []
    models = optics_models(table, {int(o): int(boxes[first[o]]) for o in uniq})
    for o in uniq:
        b, p = int(boxes[first[o]]), float(pix[first[o]])
        if b % 2:
            raise InputError(f"{path}: optics group {o} has an odd box size {b}; an even box is needed")
        model = models[int(o)]
        if ctf_switches:
            model = with_ctf_switches(model if model is not None else OpticsModel(b, p), **ctf_switches)
        optics.append(OpticsGroup(o, b, p, (n0 * p0) / (b * p), model))
    optics_index = np.searchsorted(np.array(uniq), opt_numbers)
    ctf = ctf_params_from_table(table)
    group_names, group = particle_groups(df)
    subset = column(table, "rlnRandomSubset", 0).astype(np.int64)
    if np.any(subset != 0):
        check_half_sets(subset, path)
    else:                                  # not assigned yet: drawn at random (RELION)
        subset = np.random.default_rng(seed).integers(1, 3, size=len(df))
    return ParticleData(table, images, optics, optics_index, ctf, group.astype(np.int64),
                        [str(g) for g in group_names], subset, n0, p0)


def particle_groups(df) -> tuple[NDArray, NDArray[np.int64]]:
    """(group names, each particle's 0-based group): rlnGroupName, else the micrograph, numbered as RELION's
    ExpModel::read does, by first appearance once the particles are (stably) sorted by micrograph name, so that a
    model's rlnGroupNumber means the same group to relion_refine --continue."""
    mics = df["rlnMicrographName"].astype(str).to_numpy() if "rlnMicrographName" in df.columns else None
    if "rlnGroupName" in df.columns:
        names = df["rlnGroupName"].astype(str).to_numpy()
    else:
        names = mics if mics is not None else np.array(["group1"] * len(df))
    order = np.argsort(mics, kind="stable") if mics is not None else np.arange(len(df))
    codes, uniques = pd.factorize(names[order])
    group = np.empty(len(df), np.int64)
    group[order] = codes
    return np.asarray(uniques), group


def preshift(images: NDArray[np.float32], shifts_px: NDArray[np.int64]) -> NDArray[np.float32]:
    """Translate each image's content by integer (dx, dy) px (x(x - t)), zero fill, no wrap."""
    out = np.zeros_like(images)
    n = images.shape[-1]
    for j, (dx, dy) in enumerate(shifts_px):
        dx, dy = int(dx), int(dy)
        if abs(dx) >= n or abs(dy) >= n:
            continue
        ys, yd = (slice(0, n - dy), slice(dy, n)) if dy >= 0 else (slice(-dy, n), slice(0, n + dy))
        xs, xd = (slice(0, n - dx), slice(dx, n)) if dx >= 0 else (slice(-dx, n), slice(0, n + dx))
        out[j, yd, xd] = images[j, ys, xs]
    return out


@dataclass
class PreparedBatch:
    """Fourier transforms of a batch of particles of one optics group (full rfft layout of N_o)."""

    rows: NDArray[np.int64]
    masked: NDArray[np.complex64]       # (B, N_o, N_o//2+1), for likelihood and noise
    unmasked: NDArray[np.complex64]     # (B, N_o, N_o//2+1), for back-projection
    preshift_px: NDArray[np.int64]      # (B, 2) integer pre-shift applied (= round(origin/p_o))


NOISE_STREAM = 0x6e6f697365      # ("noise"): keeps the filler's random numbers apart from every other stream


def background_noise(sigma2: NDArray[np.float64], box: int, rows: NDArray[np.int64], seed: int,
                     iteration: int) -> NDArray[np.float32]:
    """Filler images (B, N, N) of --no_zero_mask: coloured noise with per-component Fourier variance σ²(r), a new
    instance per particle and iteration, a function of (--random_seed, iteration, particle row) only (spec §2.1)."""
    white = np.stack([np.random.default_rng([int(seed) % 2 ** 63, int(iteration), int(r), NOISE_STREAM])
                      .standard_normal((box, box)) for r in rows]) if len(rows) else np.zeros((0, box, box))
    return coloured_noise(white, sigma2)


def prepare_batch(data: ParticleData, rows: NDArray[np.int64], origin_x: NDArray, origin_y: NDArray,
                  norm_factor: NDArray, mask_radius_px: float, mask_edge_px: float,
                  noise: NDArray[np.float32] | None = None) -> PreparedBatch:
    """Read, norm-correct, pre-shift by the rounded prior origin, mask and Fourier transform (spec §2.1).

    Outside the mask: the background mean (--zero_mask, noise None) or the given noise images (B, N_o, N_o).
    """
    og = data.optics[int(data.optics_index[rows[0]])]
    imgs = data.images.read(rows).astype(np.float32, copy=False)
    imgs = imgs * norm_factor[:, None, None].astype(np.float32)
    shifts = np.stack([np.rint(origin_x / og.angpix), np.rint(origin_y / og.angpix)], axis=-1).astype(np.int64)
    imgs = preshift(imgs, shifts)
    masked = mask_particles(imgs, mask_radius_px, mask_edge_px, fill="mean" if noise is None else noise)
    return PreparedBatch(rows, rfft2_centered(masked), rfft2_centered(imgs), shifts)


def iter_batches(rows: NDArray[np.int64], optics_index: NDArray[np.int64], batch: int):
    """Yield chunks of `rows` of at most `batch` particles, each within one optics group."""
    for o in np.unique(optics_index[rows]):
        sel = rows[optics_index[rows] == o]
        for s in range(0, len(sel), batch):
            yield sel[s:s + batch]


def ctf_on_pixels(data: ParticleData, rows: NDArray[np.int64], kx: NDArray, ky: NDArray,
                  do_ctf: bool) -> NDArray[np.float32]:
    """CTF values (n, m) of particles of one optics group at Fourier pixels (kx, ky) of its box, as the likelihood
    and back-projection use them: CTF(M·k) with the even Zernikes, |CTF| for phase-flipped data, CTF² for
    premultiplied data (fourier.aberrations.model_ctf); ones without --ctf."""
    if not do_ctf:
        return np.ones((len(rows), len(kx)), np.float32)
    og = data.optics[int(data.optics_index[rows[0]])]
    return model_ctf(data.ctf.subset(rows), og.optics_model, kx, ky).astype(np.float32)
