"""Assemble `<root>_report.html` (and the same figures as `<root>_report_<name>.png`) from a run's files."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from cryorefine import __version__
from cryorefine.errors import InputError
from cryorefine.io.atomic import atomic_path
from cryorefine.io.mrc import read_map
from cryorefine.report import figures as F
from cryorefine.report import readers as R
from cryorefine.report.bild import direction_counts
from cryorefine.report.directions import asu_counts, choose_order, empty_fraction, lonlat_grid
from cryorefine.report.page import Figure, Section, data_table, esc, fmt, kv_table, render

TABLE_HEADERS = {
    "iteration": "iteration", "resolution_A": "resolution (Å)", "acc_rot_deg": "accuracy angles (°)",
    "acc_trans_A": "accuracy offsets (Å)", "healpix_order": "HEALPix order", "offset_range_A": "offset range (Å)",
    "local_searches": "search", "changes_angles_deg": "changes angles (°)",
    "changes_offsets_A": "changes offsets (Å)", "image_size_px": "image size (px)", "ave_pmax": "average Pmax",
    "angular_step_deg": "angular step (°)", "offset_step_A": "offset step (Å)", "time_s": "time (s)",
}
REFRESH_S = 60      # an in-progress page reloads itself (plain HTML meta refresh, no script)


def report_paths(root: str) -> tuple[Path, Path]:
    """(`<root>_report.html`, `<root>_report.json`)."""
    return Path(f"{root}_report.html"), Path(f"{root}_report.json")


def _write_bytes(path: Path, data: bytes) -> None:
    """Atomic write (a browser never sees half a file); InputError if the folder cannot be written."""
    try:
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(data)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None


def _fig(name: str, fig, caption: str) -> Figure:
    """Render a matplotlib figure into an embedded Figure."""
    return Figure(name, F.png_bytes(fig), caption)


def _optimiser_header(path: Path) -> list[str]:
    """The comment lines at the top of an `_optimiser.star` (version, command line)."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.startswith("#"):
                if line.strip():
                    break
                continue
            out.append(line[1:].strip())
    return out


# ---------------------------------------------------------------------------------------------------------
# sections


def fsc_section(run: R.RunFiles, name: str) -> tuple[Section, float]:
    """Gold-standard FSC of every iteration (last bold) and the reported resolution."""
    curves = []
    for it in run.iterations:
        if it >= 1:
            x, y = R.fsc_curve(run.files(it)["model"])
            curves.append((it, x, y))
    final = R.fsc_curve(run.files(None)["model"]) if run.finished else None
    res = R.star_value(run.result_files["model"], "model_general", "rlnCurrentResolution")
    label = "final" if run.finished else f"iteration {run.last}"
    fig = F.fsc_iterations_figure(curves, res, final)
    html = (f"<p>Reported resolution ({label}): <b>{res:.2f} Å</b> (<code>rlnCurrentResolution</code> of "
            f"<code>{esc(run.result_files['model'])}</code>). Dotted: FSC 0.143; dashed: 0.5.</p>")
    return Section("Gold-standard FSC", html, [_fig(f"{name}_fsc", fig, "FSC between the two half maps, per "
                                                                       "iteration; the last one bold")]), res


def _relative(path: Path) -> Path:
    """The path relative to the working folder when it lies below it (pages do not show /home/...)."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return Path(path)


def postprocess_figures(pp: R.PostprocessFiles) -> dict[str, object]:
    """The postprocess FSC curves and (when the STAR has one) the Guinier plot with the fitted B-factor, as
    matplotlib figures keyed 'fsc' and 'guinier' (the report's panels and RELION's logfile.pdf pages)."""
    t, g = pp.fsc, pp.general
    labels = {"unmasked": "rlnFourierShellCorrelationUnmaskedMaps", "masked": "rlnFourierShellCorrelationMaskedMaps",
              "phase-randomised": "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps",
              "corrected": "rlnFourierShellCorrelationCorrected"}
    curves = {k: np.asarray(t[v], float) for k, v in labels.items() if v in t}
    res = float(g.get("rlnFinalResolution", np.nan))
    figs = {"fsc": F.postprocess_fsc_figure(np.asarray(t["rlnResolution"], float), curves, res)}
    if pp.guinier is not None and "rlnResolutionSquared" in pp.guinier:
        gu = pp.guinier
        ys = {k.replace("rlnLogAmplitudes", "").lower(): np.asarray(gu[k], float) for k in gu.columns
              if k.startswith("rlnLogAmplitudes") and k != "rlnLogAmplitudesIntercept"}
        figs["guinier"] = F.guinier_figure(
            np.asarray(gu["rlnResolutionSquared"], float), ys, g.get("rlnFittedSlopeGuinierPlot"),
            g.get("rlnFittedInterceptGuinierPlot"), float(g.get("rlnBfactorUsedForSharpening", 0.0)))
    return figs


def write_postprocess_logfile(postprocess_star: str | Path, path: str | Path) -> Path:
    """RELION's `logfile.pdf` of a postprocess job (what its GUI's Display shows): the FSC curves, then the
    Guinier plot, one page each, from `<o>.star`; written atomically."""
    from matplotlib.backends.backend_pdf import PdfPages
    figs = postprocess_figures(R.read_postprocess(postprocess_star))
    path = Path(path)
    try:
        with atomic_path(path) as tmp, PdfPages(tmp) as pdf:
            for fig in figs.values():
                pdf.savefig(fig)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path


def postprocess_section(pp: R.PostprocessFiles, name: str) -> Section:
    """Postprocess FSC curves and the Guinier plot with the fitted B-factor."""
    g = pp.general
    res = float(g.get("rlnFinalResolution", np.nan))
    pf = postprocess_figures(pp)
    figs = [_fig(f"{name}_postprocess_fsc", pf["fsc"], "postprocess FSC curves")]
    if "guinier" in pf:
        figs.append(_fig(f"{name}_guinier", pf["guinier"], "Guinier plot and fitted B-factor"))
    rows = [("postprocess STAR", _relative(pp.path)), ("final resolution (Å)", res),
            ("B-factor used for sharpening (Å²)", g.get("rlnBfactorUsedForSharpening", "—")),
            ("mask", g.get("rlnMaskName", "none")), ("phases randomised from (Å)", g.get("rlnRandomiseFrom", "—")),
            ("Guinier fit correlation", g.get("rlnCorrelationFitGuinierPlot", "—"))]
    return Section("Postprocess", kv_table(rows), figs)


def iterations_section(run: R.RunFiles, name: str) -> tuple[Section, pd.DataFrame]:
    """Per-iteration plots and table, numbers from the `_itNNN_` STAR files and run.out."""
    table = R.iteration_table(run.root, run.iterations, run.log.times)
    html = ("<p>From <code>run_itNNN_half1_model.star</code> (resolution, local searches, image size, Pmax), "
            "<code>_optimiser.star</code> (accuracies, changes) and <code>_sampling.star</code> (steps); time, per "
            "phase where it logs one, from <code>run.out</code>. Accuracies are estimated at the start of an "
            "iteration, changes at its end; "
            "999 = not estimated (RELION's value); search: <code>rlnOrientationalPriorMode</code> 0 = global, "
            "1 = local.</p>" + data_table(_display(table), "iterations", TABLE_HEADERS))
    figs = ([_fig(f"{name}_iterations", F.iterations_figure(table, run.log.phase_times), "per-iteration statistics")]
            if len(table) else [])
    return Section("Iterations", html, figs), table


def _display(table: pd.DataFrame) -> pd.DataFrame:
    """The iteration table as shown: search mode as words."""
    shown = table.copy()
    shown["local_searches"] = np.where(np.asarray(table["local_searches"], float) > 0, "local", "global")
    return shown


def angdist_section(run: R.RunFiles, name: str, poses: pd.DataFrame, sym: str,
                    sampling_order: int) -> tuple[Section, dict]:
    """Equal-area map of the final viewing directions folded into the asymmetric unit, and its summary."""
    rot, tilt = np.asarray(poses["rlnAngleRot"], float), np.asarray(poses["rlnAngleTilt"], float)
    order = choose_order(len(rot), sym, sampling_order)
    counts = asu_counts(rot, tilt, sym, order)
    lon, lat, grid = lonlat_grid(counts, sym, order)
    summary = {"map_order": order, "map_cells": int(counts.size), "map_empty_fraction": empty_fraction(counts),
               "sampling_order": sampling_order}
    _, c_s = direction_counts(rot, tilt, sym, sampling_order)
    summary.update(sampling_cells=int(c_s.size), sampling_empty_fraction=empty_fraction(c_s))
    title = (f"{len(rot)} particles, {sym}: {counts.size} asymmetric-unit cells (HEALPix order {order}), "
             f"{100 * summary['map_empty_fraction']:.1f} % empty")
    fig = F.angdist_figure(lon, lat, grid, title)
    rows = [("point group", sym), (f"cells at order {order} (map)", counts.size),
            ("empty cells (map)", f"{100 * summary['map_empty_fraction']:.1f} %"),
            ("particles per cell: mean / max", f"{counts.mean():.3g} / {counts.max()}"),
            (f"directions at the sampling order {sampling_order} (.bild)", c_s.size),
            ("directions with no particle (.bild)", f"{100 * summary['sampling_empty_fraction']:.1f} %")]
    bild = Path(f"{run.root}_class001_angdist.bild") if run.finished else \
        Path(f"{R.iteration_root(run.root, run.last)}_half1_class001_angdist.bild")
    html = (f"<p>Each particle's viewing direction is folded into the asymmetric unit (grey: outside it) and "
            f"counted per HEALPix cell (Mollweide projection, equal area). For ChimeraX open "
            f"<code>{esc(bild)}</code> together with the map.</p>" + kv_table(rows))
    return Section("Angular distribution", html, [_fig(f"{name}_angdist", fig, "viewing directions")]), summary


def maps_section(run: R.RunFiles, name: str, mask_path: str | None, diameter_A: float | None) -> Section:
    """Central slices and projections of the final (or latest) map and the two half maps."""
    half_paths = run.half_maps()
    halves = [read_map(p) for p in half_paths]
    if run.finished:
        main_path = Path(f"{run.root}_class001.mrc")
        main, angpix = read_map(main_path)
        maps = [("final map", main)]
        names = ["half 1 (unfiltered)", "half 2 (unfiltered)"]
        rows = f"final map <code>{esc(main_path)}</code>"
    else:
        angpix = halves[0][1]
        maps = [(f"average, it {run.last}", (halves[0][0] + halves[1][0]) / 2)]
        names = [f"half 1, it {run.last}", f"half 2, it {run.last}"]
        rows = f"average of the half maps of iteration {run.last}"
    maps += [(n, h[0]) for n, h in zip(names, halves)]
    rows += "; half maps " + ", ".join(f"<code>{esc(p)}</code>" for p in half_paths)
    mask = None
    note = "no solvent mask given: dashed circle = the spherical particle mask"
    if mask_path and Path(mask_path).exists():
        mask, _ = read_map(mask_path)
        if mask.shape != maps[0][1].shape:
            mask, note = None, f"mask {mask_path} has another box; not drawn"
        else:
            note = f"orange: 0.5 contour of the mask {mask_path}"
    radius = diameter_A / (2 * angpix) if diameter_A and angpix > 0 and mask is None else None
    fig = F.maps_figure(maps, mask, radius)
    return Section("Maps", f"<p>Central slices and projections along z, y, x ({esc(note)}). Rows: {rows}.</p>",
                   [_fig(f"{name}_maps", fig, "central slices and projections")])


def histograms_section(run: R.RunFiles, name: str, poses: pd.DataFrame, sym: str) -> Section:
    """Histograms of Pmax, significant samples, and pose changes between the last two iterations."""
    panels = [("rlnMaxValueProbDistribution", np.asarray(poses["rlnMaxValueProbDistribution"], float), False),
              ("rlnNrOfSignificantSamples", np.asarray(poses["rlnNrOfSignificantSamples"], float), True)]
    its = [i for i in run.iterations if i >= 1]
    note = ""
    if len(its) >= 2:
        a, b = its[-2], its[-1]
        d_ang, d_off = R.pose_changes(R.pose_arrays(run.files(a)["data"]), R.pose_arrays(run.files(b)["data"]), sym)
        panels += [(f"angle change it {a}→{b} (°)", d_ang, True), (f"offset change it {a}→{b} (Å)", d_off, True)]
    else:
        note = " Pose changes need two iterations with poses."
    return Section("Per-particle statistics", f"<p>Final (or latest) poses.{esc(note)}</p>",
                   [_fig(f"{name}_histograms", F.histograms_figure(panels), "per-particle histograms")])


# ---------------------------------------------------------------------------------------------------------
# the page


def _status(run: R.RunFiles) -> tuple[str, str]:
    """(status text, css class)."""
    st = run.status()
    if st == "finished":
        return f"Finished: converged after {run.last} iterations.", "finished"
    if st == "stopped":
        text = (f"Stopped after iteration {run.last} (--auto_iter_max) without convergence: no final map; "
                f"showing iteration {run.last}.")
        return text, "stopped"
    text = (f"Run in progress (or interrupted): iteration {run.last} is the latest written; this page is "
            f"refreshed after every iteration.")
    return text, "progress"


def _safe(title: str, make: Callable[[], Section], errors: list[str]) -> Section:
    """A section, or a note saying why it could not be drawn (e.g. a file still being written)."""
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
        errors.append(f"{title}: {exc}")
        return Section(title, f'<p class="note">Not available: {esc(type(exc).__name__)}: {esc(exc)}</p>')


@dataclass
class Facts:
    """What the page's summary and sections share: the run's files and numbers read once."""

    run: R.RunFiles
    name: str                        # figure-file prefix, `<run name>_report`
    sym: str
    sampling_order: int
    command: str
    version: str
    mask_path: str | None
    diameter_A: float
    poses: pd.DataFrame
    postprocess: R.PostprocessFiles | None


def _recorded_postprocess(json_path: Path, given: str | None) -> str | None:
    """The postprocess STAR to include: the given one, else the one an earlier report recorded (if it exists)."""
    if given is None and json_path.exists():
        try:
            given = json.loads(json_path.read_text()).get("postprocess")
        except (OSError, ValueError):
            given = None
    return given if given and Path(given).exists() else None


def read_facts(run: R.RunFiles, postprocess: str | None) -> Facts:
    """Read the result files' shared numbers (optimiser, sampling, data STAR; optional postprocess STAR)."""
    files = run.result_files
    opt = R.star_block(files["optimiser"], "optimiser_general")
    samp = R.star_block(files["sampling"], "sampling_general", ["rlnSymmetryGroup", "rlnHealpixOrder"])
    header = _optimiser_header(files["optimiser"])
    mask = str(opt.get("rlnSolventMaskName", "None"))
    pp = R.read_postprocess(postprocess) if postprocess else None
    if mask == "None" and pp is not None and pp.general.get("rlnMaskName"):
        mask = str(pp.general["rlnMaskName"])
    return Facts(run=run, name=Path(run.root).name + "_report", sym=str(samp["rlnSymmetryGroup"]),
                 sampling_order=int(samp["rlnHealpixOrder"]),
                 command=run.log.command_line or (header[1] if len(header) > 1 else ""),
                 version=next((h for h in header if "version" in h), f"cryorefine {__version__}"),
                 mask_path=None if mask == "None" else mask, diameter_A=float(opt.get("rlnParticleDiameter", 0) or 0),
                 poses=R.pose_arrays(files["data"]), postprocess=pp)


def build_sections(f: Facts, errors: list[str], out: dict) -> list[Section]:
    """Every section of the page in order; `out` collects the numbers the JSON record keeps."""
    run, name = f.run, f.name

    def keep(key: str, make: Callable[[], tuple[Section, object]]) -> Callable[[], Section]:
        def _make() -> Section:
            sec, out[key] = make()
            return sec
        return _make
    sections = [_safe("Gold-standard FSC", keep("resolution_A", lambda: fsc_section(run, name)), errors)]
    if f.postprocess is not None:
        sections.append(_safe("Postprocess", lambda: postprocess_section(f.postprocess, name), errors))
    sections += [
        _safe("Iterations", keep("table", lambda: iterations_section(run, name)), errors),
        _safe("Angular distribution", keep("angular_distribution", lambda: angdist_section(
            run, name, f.poses, f.sym, f.sampling_order)), errors),
        _safe("Maps", lambda: maps_section(run, name, f.mask_path, f.diameter_A), errors),
        _safe("Per-particle statistics", lambda: histograms_section(run, name, f.poses, f.sym), errors)]
    return sections


def summary_rows(f: Facts, resolution_A: float | None) -> list[tuple[str, object]]:
    """The summary table: run, status, command line, version, inputs, point group, particles, resolution, time,
    memory."""
    run, log = f.run, f.run.log
    halves = np.bincount(np.asarray(f.poses.get("rlnRandomSubset", np.zeros(len(f.poses))), int), minlength=3)
    if log.wall_time_s is not None:
        wall = f"{log.wall_time_s:.0f} s"
    else:
        wall = f"{sum(log.times.values()):.0f} s so far (sum of iteration times)" if log.times else "—"
    rows = [("run", run.root), ("status", run.status()), ("command line", f.command or "—"), ("version", f.version),
            *((f"input: {k}", v) for k, v in R.input_files(f.command).items()),
            ("point group", f.sym), ("box / pixel size", _box_text(run.result_files["model"])),
            ("particles", f"{len(f.poses)} ({halves[1]} in half 1, {halves[2]} in half 2)"),
            ("iterations written", f"{run.iterations[0]}–{run.last}"),
            ("resolution" + (" (final)" if run.finished else f" (iteration {run.last})"),
             f"{resolution_A:.2f} Å" if resolution_A else "—")]
    if f.postprocess is not None:
        rows.append(("resolution after postprocess", f"{float(f.postprocess.general['rlnFinalResolution']):.2f} Å"))
    peak = f"{log.peak_memory_gib:.2f} GiB" if log.peak_memory_gib is not None else "— (logged at the end)"
    return rows + [("wall time", wall), ("peak memory (RSS)", peak)]


def write_report(root: str, postprocess: str | None = None, out_root: str | None = None) -> Path:
    """Write `<root>_report.html`, its PNGs and `<root>_report.json` (under `out_root` instead when given: a job
    writes only into its own folder); returns the HTML path.

    `postprocess`: a postprocess STAR to include; default: the one recorded in an earlier report's JSON."""
    t0 = time.time()
    run = R.open_run(root)
    dest = out_root or run.root
    html_path, json_path = report_paths(dest)
    postprocess = _recorded_postprocess(json_path, postprocess)
    facts = replace(read_facts(run, postprocess), name=Path(dest).name + "_report")
    errors: list[str] = []
    kept: dict = {}
    sections = build_sections(facts, errors, kept)
    status, css = _status(run)
    footer = (f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by cryorefine {__version__} "
              f"(cryorefine report {run.root}) in {time.time() - t0:.1f} s.")
    if errors:
        footer += " Sections not drawn: " + "; ".join(errors)
    text = render(f"cryorefine auto-refine report: {run.root}", status, css,
                  summary_rows(facts, kept.get("resolution_A")), sections,
                  refresh_s=REFRESH_S if run.status() == "in progress" else None, footer=footer)
    for sec in sections:
        for fig in sec.figures:
            _write_bytes(Path(dest).parent / f"{fig.name}.png", fig.png)
    _write_bytes(html_path, text.encode("utf-8"))
    table = kept.get("table")
    record = {"root": run.root, "status": run.status(),
              "postprocess": str(Path(postprocess).resolve()) if postprocess else None,
              "resolution_A": kept.get("resolution_A"), "angular_distribution": kept.get("angular_distribution"),
              "iterations": json.loads(table.to_json(orient="records")) if table is not None else [],
              "errors": errors}
    _write_bytes(json_path, json.dumps(record, indent=1).encode("utf-8"))
    return html_path


def _box_text(model_star: Path) -> str:
    """'64 px, 2.5 Å/px' from a model STAR."""
    g = R.star_block(model_star, "model_general", ["rlnOriginalImageSize", "rlnPixelSize"])
    return f"{int(g['rlnOriginalImageSize'])} px, {fmt(float(g['rlnPixelSize']))} Å/px"
