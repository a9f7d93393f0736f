"""Report figures: small pure functions taking arrays and returning a matplotlib Figure (Agg, no display).

Conventions: resolution axes in 1/Å (labels also in Å); angles in degrees; offsets in Å; maps are (z, y, x)
arrays shown with x to the right and y (or z) up; directions are (rot, tilt) with longitude = rot and
latitude = 90° − tilt on an equal-area Mollweide map. matplotlib is imported lazily (only here).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:                                    # pragma: no cover
    from matplotlib.figure import Figure

FSC_LINES = (0.143, 0.5)
UNSET = 999.0        # RELION's "not estimated" value of accuracies and changes


def _mpl():
    """matplotlib with the Agg backend (works without a display)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    return matplotlib, Figure


def new_figure(width: float, height: float) -> Figure:
    """A Figure not registered with pyplot (no global state), constrained layout."""
    _, Figure = _mpl()
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


ANGSTROM_TICKS = (100, 50, 30, 20, 15, 10, 8, 7, 6, 5, 4.5, 4, 3.5, 3, 2.5, 2.2, 2, 1.8, 1.6, 1.5)


def _angstrom_ticks(ax) -> None:
    """Top axis of a 1/Å axis labelled in Å (at most 8 ticks, from ANGSTROM_TICKS)."""
    lo, hi = ax.get_xlim()
    ticks = [a for a in ANGSTROM_TICKS if lo < 1.0 / a <= hi]
    ticks = ticks[:: max(1, -(-len(ticks) // 8))]
    top = ax.twiny()
    top.set_xlim(lo, hi)
    top.set_xticks([1.0 / a for a in ticks], [f"{a:g}" for a in ticks], fontsize=8)
    top.set_xlabel("resolution (Å)", fontsize=9)


def _fsc_axes(ax, resolution_A: float | None, label: str = "reported") -> None:
    """0.143 and 0.5 lines, the reported resolution, limits and labels of an FSC plot."""
    for y, style in zip(FSC_LINES, (":", "--")):
        ax.axhline(y, color="grey", ls=style, lw=1)
        ax.text(0.99, y, f" {y:g}", transform=ax.get_yaxis_transform(), va="bottom", ha="right",
                fontsize=8, color="grey")
    if resolution_A and np.isfinite(resolution_A) and resolution_A > 0:
        x = 1.0 / resolution_A
        right = x > 0.7 * ax.get_xlim()[1]           # label on the line's left near the right edge
        ax.axvline(x, color="tab:red", lw=1.2)
        ax.text(x, 0.97, f" {label} {resolution_A:.2f} Å ", color="tab:red", fontsize=9, va="top",
                ha="right" if right else "left", transform=ax.get_xaxis_transform())
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlim(left=0)
    ax.set_xlabel("resolution (1/Å)")
    ax.set_ylabel("FSC")
    _angstrom_ticks(ax)


def fsc_iterations_figure(curves: Sequence[tuple[int, NDArray, NDArray]], resolution_A: float | None,
                          final: tuple[NDArray, NDArray] | None = None) -> Figure:
    """Gold-standard FSC of each iteration (thin, coloured by iteration) with the last one bold; `final` (if
    given) is the joined final iteration's curve, drawn bold black instead."""
    matplotlib, _ = _mpl()
    fig = new_figure(7.5, 4.2)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"]
    n = len(curves)
    for k, (it, x, y) in enumerate(curves):
        last = k == n - 1 and final is None
        ax.plot(x, y, color="black" if last else cmap(k / max(n - 1, 1)), lw=2.4 if last else 1.0,
                label=f"iteration {it}" if (last or k in (0, n - 2)) else None, zorder=3 if last else 2)
    if final is not None:
        ax.plot(final[0], final[1], color="black", lw=2.4, label="final (joined halves)", zorder=3)
    _fsc_axes(ax, resolution_A)
    ax.set_title("Gold-standard FSC between the half maps")
    if ax.get_legend_handles_labels()[1]:       # none before iteration 1: no empty legend (and no warning)
        ax.legend(fontsize=8, loc="lower left")
    return fig


def postprocess_fsc_figure(x: NDArray, curves: dict[str, NDArray], resolution_A: float) -> Figure:
    """Postprocess FSC curves (unmasked, masked, phase-randomised, corrected) with the final resolution."""
    fig = new_figure(7.5, 4.2)
    ax = fig.add_subplot()
    styles = {"corrected": {"color": "black", "lw": 2.4}, "unmasked": {"color": "tab:green", "lw": 1.2},
              "masked": {"color": "tab:blue", "lw": 1.2}, "phase-randomised": {"color": "tab:red", "lw": 1.2}}
    for name, y in curves.items():
        ax.plot(x, y, label=name, **styles.get(name, {}))
    _fsc_axes(ax, resolution_A, label="final")
    ax.set_title("Postprocess: FSC of the masked, unmasked and phase-randomised half maps")
    ax.legend(fontsize=8, loc="lower left")
    return fig


def guinier_figure(x: NDArray, curves: dict[str, NDArray], slope: float | None, intercept: float | None,
                   bfactor: float) -> Figure:
    """Guinier plot ln(mean |F|) vs 1/d² (1/Å²) with the fitted straight line (B = 4·slope)."""
    fig = new_figure(7.5, 4.0)
    ax = fig.add_subplot()
    for name, y in curves.items():
        y = np.asarray(y, float)
        ok = y > -99
        ax.plot(np.asarray(x)[ok], y[ok], label=name, lw=1.2)
    if slope is not None and intercept is not None:
        xs = np.asarray(x, float)
        xs = xs[xs >= 0.01] if np.any(xs >= 0.01) else xs
        ax.plot(xs, slope * xs + intercept, "k--", lw=1.2, label=f"fit: B = {4 * slope:.1f} Å²")
    ax.set_xlabel("1/d² (1/Å²)")
    ax.set_ylabel("ln(mean |F|)")
    ax.set_title(f"Guinier plot (B-factor used for sharpening: {bfactor:.1f} Å²)")
    ax.legend(fontsize=8)
    return fig


def _masked(y: ArrayLike) -> NDArray:
    """Values as floats with RELION's 999 'unset' marker as NaN."""
    y = np.asarray(y, dtype=float)
    return np.where(y >= UNSET, np.nan, y)


def _phase_bars(ax, it: NDArray, phase_times: dict[int, dict[str, float]]) -> None:
    """Stacked bars of each iteration's seconds per phase (the log's `Time:` lines), phases in order of first use."""
    names = list(dict.fromkeys(name for t in phase_times.values() for name in t))
    bottom = np.zeros(len(it))
    for k, name in enumerate(names):
        h = np.array([phase_times.get(int(i), {}).get(name, 0.0) for i in it])
        ax.bar(it, h, bottom=bottom, width=0.8, label=name, color=f"C{k}")
        bottom += h
    ax.legend(fontsize=6, ncol=2)


def iterations_figure(table, phase_times: dict[int, dict[str, float]] | None = None) -> Figure:
    """Per-iteration panels: resolution, accuracies and steps, changes, time (stacked by phase where the log gives
    phases); local-search iterations shaded."""
    it = np.asarray(table["iteration"], int)
    local = np.asarray(table["local_searches"], float) > 0
    panels = [
        ("Resolution (Å)", [("current resolution", table["resolution_A"])]),
        ("Angles (°)", [("estimated accuracy", _masked(table["acc_rot_deg"])),
                        ("angular step", table["angular_step_deg"])]),
        ("Offsets (Å)", [("estimated accuracy", _masked(table["acc_trans_A"])),
                         ("offset step", table["offset_step_A"])]),
        ("Changes in angles (°)", [("mean change", _masked(table["changes_angles_deg"]))]),
        ("Changes in offsets (Å)", [("rms change", _masked(table["changes_offsets_A"]))]),
        ("Wall time per iteration (s)", [("time", table["time_s"])]),
    ]
    fig = new_figure(10.5, 5.6)
    axes = fig.subplots(2, 3)
    for ax, (title, series) in zip(axes.ravel(), panels):
        if title.startswith("Wall time") and phase_times:
            _phase_bars(ax, it, phase_times)
            series = []
        for k, (name, y) in enumerate(series):
            ax.plot(it, np.asarray(y, float), "o-", ms=4, lw=1.3, label=name, color=f"C{k}")
        for i in it[local]:
            ax.axvspan(i - 0.5, i + 0.5, color="tab:orange", alpha=0.12, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        if len(it):
            ax.set_xticks(it[:: max(1, -(-len(it) // 10))])          # at most 10 labelled iterations
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.suptitle("Per iteration (shaded: local searches)", fontsize=11)
    return fig


def angdist_figure(lon_deg: NDArray, lat_deg: NDArray, counts: NDArray, title: str) -> Figure:
    """Equal-area (Mollweide) map of particle counts per direction cell; NaN cells (outside the asymmetric
    unit) grey. `counts` has shape (len(lat_deg), len(lon_deg)) on cell-centre grids in degrees."""
    matplotlib, _ = _mpl()
    fig = new_figure(8.0, 4.6)
    ax = fig.add_subplot(projection="mollweide")
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    c = np.ma.masked_invalid(np.asarray(counts, float))
    mesh = ax.pcolormesh(np.deg2rad(lon_deg), np.deg2rad(lat_deg), c, cmap=cmap, shading="nearest",
                         vmin=0, vmax=max(float(np.nanmax(counts)) if np.isfinite(counts).any() else 1.0, 1.0),
                         rasterized=True)
    ax.grid(True, color="white", lw=0.4, alpha=0.6)
    ax.tick_params(labelsize=7)
    ax.tick_params(axis="x", labelsize=6, labelcolor="#555555")
    ax.set_xlabel("rot (°)")
    ax.set_ylabel("90° − tilt (°)")
    fig.colorbar(mesh, ax=ax, orientation="horizontal", shrink=0.6, pad=0.06, label="particles per cell")
    ax.set_title(title, fontsize=10)
    return fig


def _views(vol: NDArray) -> list[tuple[str, NDArray]]:
    """Central slices and projections along z, y, x of a (z, y, x) map, each shown with origin lower-left."""
    n = vol.shape[0] // 2
    return [("slice z", vol[n]), ("slice y", vol[:, n, :]), ("slice x", vol[:, :, n]),
            ("projection z", vol.sum(0)), ("projection y", vol.sum(1)), ("projection x", vol.sum(2))]


def maps_figure(maps: Sequence[tuple[str, NDArray]], mask: NDArray | None = None,
                mask_radius_px: float | None = None) -> Figure:
    """Rows of maps, columns: central slices and projections along z, y, x; the mask's 0.5 contour on the slices
    (or, without a mask, the spherical particle mask as a dashed circle)."""
    fig = new_figure(12.0, 2.15 * len(maps) + 0.4)
    axes = np.atleast_2d(fig.subplots(len(maps), 6))
    mask_views = _views(mask) if mask is not None else None
    for row, (name, vol) in enumerate(maps):
        for col, (vname, img) in enumerate(_views(np.asarray(vol, np.float32))):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", origin="lower", interpolation="nearest")
            if col < 3 and mask_views is not None:
                ax.contour(mask_views[col][1], levels=[0.5], colors="tab:orange", linewidths=0.8)
            elif col < 3 and mask_radius_px:
                c = (img.shape[0] - 1) / 2 + 0.5 * (img.shape[0] % 2 == 0)
                t = np.linspace(0, 2 * np.pi, 200)
                ax.plot(c + mask_radius_px * np.cos(t), c + mask_radius_px * np.sin(t), "--", color="tab:orange",
                        lw=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(vname, fontsize=9)
            if col == 0:
                ax.set_ylabel(name, fontsize=9)
    return fig


def histograms_figure(panels: Sequence[tuple[str, NDArray, bool]]) -> Figure:
    """One histogram per (title, values, log y-axis) panel, in a row."""
    fig = new_figure(3.0 * max(len(panels), 1), 2.8)
    axes = np.atleast_1d(fig.subplots(1, max(len(panels), 1)))
    for ax, (title, values, logy) in zip(axes, panels):
        v = np.asarray(values, float)
        v = v[np.isfinite(v)]
        ax.hist(v, bins=40, color="tab:blue", alpha=0.85, log=logy)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("particles", fontsize=8)
        ax.tick_params(labelsize=7)
        if v.size:
            ax.axvline(float(np.median(v)), color="k", lw=1, ls="--")
            ax.text(0.97, 0.95, f"median {np.median(v):.3g}", transform=ax.transAxes, ha="right", va="top",
                    fontsize=7)
    return fig
