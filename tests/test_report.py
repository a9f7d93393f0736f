"""`cryorefine report`: the page of a (small, stopped) refinement, its iteration table against the STAR files,
RELION's .bild layout, a missing run, an unfinished run, a finished run and a postprocess run.

One refinement of 200 particles with --auto_iter_max 2 feeds every test in this module.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import time
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import write_subset

from cryorefine.cli import main
from cryorefine.geometry.euler import projection_direction
from cryorefine.geometry.sampling import angular_step, directions
from cryorefine.geometry.symmetry import symmetry_matrices
from cryorefine.io.star import read_star
from cryorefine.report import write_report
from cryorefine.report.bild import angdist_bild, direction_counts, fold_directions

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cryorefine", *args], cwd=cwd, capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def stopped_run(small_set: Path, tmp_path_factory) -> Path:
    """Output root of a 2-iteration refinement of 200 particles (reports written by refine itself)."""
    d = tmp_path_factory.mktemp("report_run")
    cached = os.environ.get("CRYOREFINE_TEST_REPORT_RUN")
    if cached:      # development only: reuse this fixture's earlier run (its page redrawn by the current code)
        shutil.copytree(Path(cached).parent, d / "Refine3D")
        write_report(str(d / "Refine3D/run"))
        return d / "Refine3D/run"
    write_subset(small_set, 200, d / "p.star")
    proc = _cli("refine", "--i", str(d / "p.star"), "--ref", str(small_set / "reference.mrc"), "--o",
                str(d / "Refine3D/run"), "--ini_high", "50", "--sym", "D2", "--particle_diameter", "150",
                "--auto_iter_max", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d / "Refine3D/run"


class _Page(HTMLParser):
    """Images (src, data-file) and the cells of table#iterations."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, str]] = []
        self.rows: list[dict[str, str]] = []
        self._in_table = False
        self._col: str | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append((a.get("src", ""), a.get("data-file", "")))
        elif tag == "table" and a.get("id") == "iterations":
            self._in_table = True
        elif tag == "tr" and self._in_table:
            self.rows.append({})
        elif tag == "td" and self._in_table:
            self._col = a.get("data-col")

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        elif tag == "td":
            self._col = None

    def handle_data(self, data):
        self.text.append(data)
        if self._in_table and self._col:
            self.rows[-1][self._col] = self.rows[-1].get(self._col, "") + data


def _page(html_path: Path) -> _Page:
    p = _Page()
    p.feed(html_path.read_text(encoding="utf-8"))
    p.rows = [r for r in p.rows if r]
    return p


def _value(cell: str) -> float:
    return np.nan if cell.strip() == "—" else float({"local": 1, "global": 0}.get(cell.strip(), cell))


def test_page_embeds_every_image_and_they_decode(stopped_run: Path):
    import matplotlib.image as mpimg
    html = Path(f"{stopped_run}_report.html")
    assert html.exists()
    text = html.read_text(encoding="utf-8")
    assert "<script" not in text.lower() and "http://" not in text and "https://" not in text
    page = _page(html)
    assert len(page.images) >= 5
    for src, name in page.images:
        assert src.startswith("data:image/png;base64,"), src[:40]
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        img = mpimg.imread(io.BytesIO(png), format="png")
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert (stopped_run.parent / f"{name}.png").read_bytes() == png        # the same figure beside the page
    assert "Stopped after iteration 2" in text


def test_iteration_table_equals_star_files_and_log(stopped_run: Path):
    rows = _page(Path(f"{stopped_run}_report.html")).rows
    assert [int(_value(r["iteration"])) for r in rows] == [1, 2]
    times = {int(m.group(1)): float(m.group(2)) for m in
             re.finditer(r"Iteration (\d+) took ([\d.]+) s", Path(f"{stopped_run}.out").read_text())}
    for r in rows:
        it = int(_value(r["iteration"]))
        base = f"{stopped_run}_it{it:03d}"
        model = read_star(f"{base}_half1_model.star")["model_general"]
        opt = read_star(f"{base}_optimiser.star")["optimiser_general"]
        samp = read_star(f"{base}_sampling.star")["sampling_general"]
        expected = {
            "resolution_A": model["rlnCurrentResolution"], "image_size_px": model["rlnCurrentImageSize"],
            "local_searches": model["rlnOrientationalPriorMode"], "ave_pmax": model["rlnAveragePmax"],
            "acc_rot_deg": opt["rlnOverallAccuracyRotations"],
            "acc_trans_A": opt["rlnOverallAccuracyTranslationsAngst"],
            "changes_angles_deg": opt["rlnChangesOptimalOrientations"],
            "changes_offsets_A": opt["rlnChangesOptimalOffsets"],
            "healpix_order": samp["rlnHealpixOrder"], "offset_range_A": samp["rlnOffsetRange"],
            "angular_step_deg": angular_step(samp["rlnHealpixOrder"] + opt["rlnAdaptiveOversampleOrder"]),
            "offset_step_A": samp["rlnOffsetStep"] / 2 ** opt["rlnAdaptiveOversampleOrder"],
            "time_s": times[it],
        }
        for col, want in expected.items():
            np.testing.assert_allclose(_value(r[col]), float(want), rtol=2e-5, err_msg=f"iteration {it} {col}")


def test_log_phase_times_add_up_to_the_iteration(stopped_run: Path):
    """The per-iteration `Time:` lines (read back for the report's stacked time panel) hold each iteration's
    phases, which together take most of the iteration and never more than it."""
    from cryorefine.report.readers import read_log
    log = read_log(Path(f"{stopped_run}.out"))
    assert sorted(log.phase_times) == [1, 2]
    assert list(log.phase_times[1])[:2] == ["references", "E-step"]        # in the order they ran
    assert "accuracy" in log.phase_times[2] and "accuracy" not in log.phase_times[1]   # not in the CC iteration
    for it, phases in log.phase_times.items():
        total = sum(phases.values())
        assert 0.6 * log.times[it] <= total <= log.times[it] + 0.05 * len(phases), (it, phases, log.times[it])


def _cylinders(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(colours (n, 3), cylinders (n, 7)) of a .bild text, checking RELION's .color/.cylinder pairing."""
    lines = text.splitlines()
    assert len(lines) % 2 == 0 and lines
    cols, cyls = [], []
    for c, y in zip(lines[::2], lines[1::2]):
        assert c.startswith(".color ") and y.startswith(".cylinder ")
        cols.append([float(v) for v in c.split()[1:]])
        cyls.append([float(v) for v in y.split()[1:]])
    return np.array(cols), np.array(cyls)


def test_bild_is_relions_layout_centred_on_the_box():
    _, rot, tilt = directions(2, "C1")
    counts = np.zeros(len(rot), int)
    counts[[3, 10, 40]] = [6, 3, 1]
    r_all = np.repeat(rot, counts)
    t_all = np.repeat(tilt, counts)
    box, angpix = 64, 2.5
    cols, cyl = _cylinders(angdist_bild(r_all, t_all, box, angpix, "C1", 2))
    assert len(cyl) == 3                                             # one cylinder per direction with particles
    r = box * angpix / 2
    centre = np.full(3, r)
    start, end = cyl[:, :3] - centre, cyl[:, 3:6] - centre
    np.testing.assert_allclose(np.linalg.norm(start, axis=1), r, rtol=1e-5)    # spikes on a sphere round the map
    lengths = np.linalg.norm(end, axis=1) - r
    np.testing.assert_allclose(lengths, 0.3 * r * np.array([6, 3, 1]) / 6, rtol=1e-4)   # ∝ count, max 0.3 R
    dirs = projection_direction(rot[[3, 10, 40]], tilt[[3, 10, 40]])
    np.testing.assert_allclose(start / r, dirs, atol=1e-4)
    np.testing.assert_allclose(cyl[:, 6], 0.5 * np.pi * r * angular_step(2) / 360, rtol=1e-4)
    sd_units = (np.array([6, 3, 1]) - counts.mean()) / counts.std(ddof=1)
    np.testing.assert_allclose(cols[:, 0], (np.clip(sd_units, -1, 5) + 1) / 6, atol=1e-5)   # red: sd above mean
    np.testing.assert_allclose(cols[:, 0] + cols[:, 2], 1.0, atol=1e-5)
    assert np.all(cols[:, 1] == 0)


def test_symmetry_mates_fall_in_the_same_asymmetric_unit_cell():
    rng = np.random.default_rng(3)
    d = rng.normal(size=(300, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    cells = []
    for r in symmetry_matrices("D2"):
        v = d @ r.T
        rot, tilt = np.rad2deg(np.arctan2(v[:, 1], v[:, 0])), np.rad2deg(np.arccos(np.clip(v[:, 2], -1, 1)))
        cells.append(fold_directions(rot, tilt, "D2", 3)[0])
    same = np.mean([np.mean(c == cells[0]) for c in cells[1:]])
    assert same > 0.97                                              # ties on cell borders may go either way
    assert len(np.unique(cells[0])) > 100


def test_run_bild_files_fold_the_half_sets_into_the_asymmetric_unit(stopped_run: Path):
    data = read_star(f"{stopped_run}_it002_data.star")["particles"]
    samp = read_star(f"{stopped_run}_it002_sampling.star")["sampling_general"]
    for h in (1, 2):
        half = data[data["rlnRandomSubset"] == h]
        _, cyl = _cylinders(Path(f"{stopped_run}_it002_half{h}_class001_angdist.bild").read_text())
        _, counts = direction_counts(half["rlnAngleRot"], half["rlnAngleTilt"], "D2", int(samp["rlnHealpixOrder"]))
        assert counts.sum() == len(half) and len(cyl) == np.count_nonzero(counts)
        r = 64 * 2.5 / 2
        start = cyl[:, :3] - r
        np.testing.assert_allclose(np.linalg.norm(start, axis=1), r, rtol=1e-4)
        assert np.all(start[:, 2] >= -1e-3)                          # D2 asymmetric unit: tilt <= 90
        lengths = np.linalg.norm(cyl[:, 3:6] - r, axis=1) - r
        np.testing.assert_allclose(np.sort(lengths), np.sort(0.3 * r * counts[counts > 0] / counts.max()),
                                   rtol=1e-3, atol=1e-3)


def test_missing_run_is_one_line_exit_2(tmp_path: Path, capsys):
    for root in (tmp_path / "nowhere/run", tmp_path / "run"):
        assert main(["report", str(root)]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "no such run" in lines[0] and str(root) in lines[0], err


def test_run_without_complete_iterations_names_the_missing_file(stopped_run: Path, tmp_path: Path, capsys):
    """Optimiser files whose _data.star files were removed: the line names what is missing (it said there were no
    optimiser files)."""
    for f in stopped_run.parent.glob(f"{stopped_run.name}_it00*_*.star"):
        if not f.name.endswith("_data.star"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    assert main(["report", str(tmp_path / stopped_run.name)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no complete iteration: run_it002_data.star" in lines[0], lines


def test_run_found_from_its_folder_or_one_of_its_files(stopped_run: Path):
    from cryorefine.report.readers import open_run
    for given in (stopped_run.parent, f"{stopped_run}_it001_optimiser.star", f"{stopped_run}_it002_data.star"):
        run = open_run(str(given))
        assert run.root == str(stopped_run) and run.iterations == [0, 1, 2] and run.status() == "stopped"


def test_job_folder_with_a_continued_run_reports_the_newest(stopped_run: Path, tmp_path: Path, capsys):
    """A job folder holding run_* and its continuation run_ct1_* (RELION's --continue names): the folder means the
    newest; two unrelated runs stay a question for the user."""
    from cryorefine.report.readers import open_run
    for f in stopped_run.parent.glob("run_it00[012]_*.star"):
        shutil.copy(f, tmp_path / f.name)
    time.sleep(0.05)
    for f in stopped_run.parent.glob("run_it00[12]_*.star"):
        shutil.copy(f, tmp_path / f.name.replace("run_", "run_ct1_"))
    assert open_run(str(tmp_path)).root == str(tmp_path / "run_ct1")
    for f in stopped_run.parent.glob("run_it001_*.star"):
        shutil.copy(f, tmp_path / f.name.replace("run_", "other_"))
    assert main(["report", str(tmp_path)]) == 2
    assert "several runs in this folder (other, run, run_ct1)" in capsys.readouterr().err


def test_unfinished_run_gives_partial_report_in_progress(stopped_run: Path, tmp_path: Path):
    src = stopped_run.parent
    for f in src.glob("run_it00[01]_*"):
        if "report" not in f.name:
            shutil.copy(f, tmp_path / f.name)
    log = Path(f"{stopped_run}.out").read_text().split(" Auto-refine: Iteration= 2")[0]
    (tmp_path / "run.out").write_text(log)
    assert main(["report", str(tmp_path / "run")]) == 0
    page = _page(tmp_path / "run_report.html")
    text = "".join(page.text)
    assert "Run in progress" in text and "iteration 1 is the latest" in text
    assert [int(_value(r["iteration"])) for r in page.rows] == [1]
    assert len(page.images) >= 4
    assert 'http-equiv="refresh"' in (tmp_path / "run_report.html").read_text()


def test_finished_run_and_postprocess(stopped_run: Path, small_set: Path, tmp_path: Path, capsys):
    """A finished run (final files made from iteration 2's) shows the final map, wall time and peak memory;
    postprocess of its halves adds its FSC curves and Guinier plot to the same page."""
    d = tmp_path / "Refine3D"
    d.mkdir()
    for f in stopped_run.parent.glob("run_it00[012]_*"):
        if "report" not in f.name:
            shutil.copy(f, d / f.name)
    it2 = d / "run_it002"
    for kind in ("optimiser.star", "sampling.star", "data.star"):
        shutil.copy(f"{it2}_{kind}", d / f"run_{kind}")
    shutil.copy(f"{it2}_half1_model.star", d / "run_model.star")
    shutil.copy(f"{it2}_half1_class001.mrc", d / "run_class001.mrc")
    shutil.copy(f"{it2}_half1_class001_angdist.bild", d / "run_class001_angdist.bild")
    for h in (1, 2):
        shutil.copy(f"{it2}_half{h}_class001.mrc", d / f"run_half{h}_class001_unfil.mrc")
    log = Path(f"{stopped_run}.out").read_text()
    assert re.search(r" Wall time: .*\([\d.]+ s\); peak memory: [\d.]+ GiB", log)     # refine's summary line
    (d / "run.out").write_text(log.replace("Stopped after --auto_iter_max", "(was stopped)"))
    write_report(str(d / "run"))
    text = "".join(_page(d / "run_report.html").text)
    assert "Finished: converged after 2 iterations" in text and "final map" in text
    assert "peak memory (RSS)" in text and "— (logged at the end)" not in text
    capsys.readouterr()
    before = {f.name: f.stat().st_mtime_ns for f in d.iterdir()}
    assert main(["postprocess", "--i", str(d / "run_half1_class001_unfil.mrc"), "--mask",
                 str(small_set / "mask.mrc"), "--o", str(tmp_path / "PostProcess/postprocess"), "--auto_bfac",
                 "--autob_lowres", "40"]) == 0
    pp = tmp_path / "PostProcess"
    assert f"report: {pp / 'postprocess'}_report.html (of the refine run {d / 'run'})" in capsys.readouterr().out
    # a job writes only into its own folder (RELION's pipeliner): the refine job's files are as they were
    assert {f.name: f.stat().st_mtime_ns for f in d.iterdir()} == before
    page = _page(pp / "postprocess_report.html")
    names = {name for _, name in page.images}
    assert {"postprocess_report_postprocess_fsc", "postprocess_report_guinier"} <= names
    assert (pp / "postprocess_report_postprocess_fsc.png").is_file()
    assert "resolution after postprocess" in "".join(page.text) and "Finished: converged" in "".join(page.text)


def test_report_module_is_imported_lazily():
    code = ("import sys, cryorefine.cli, cryorefine.report, cryorefine.refine.loop, cryorefine.tools.postprocess; "
            "cryorefine.cli.build_parser(''); print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "False", out.stderr


class _FakeChild:
    """A Popen stand-in that is running until `done` is set; it 'prints' `text` into the given file."""

    def __init__(self, out, text: str, rc: int):
        self.out, self.text, self.rc, self.done, self.returncode = out, text, rc, False, None

    def poll(self):
        if self.done and self.returncode is None:
            self.out.write(self.text.encode())
            self.returncode = self.rc
        return self.returncode

    def wait(self, timeout=None):
        if not self.done:
            import subprocess as sp
            raise sp.TimeoutExpired("child", timeout)
        return self.poll()

    def terminate(self):
        self.done, self.rc = True, -15


def test_report_redraw_during_a_run_waits_for_the_previous_one():
    """A redraw is started only when the previous child has finished; what a child prints is logged, a failed or
    stopped child gives one warning line naming the page."""
    import cryorefine.report as rep
    children, lines = [], []

    def launch(root, out):
        children.append(_FakeChild(out, " WARNING: could not write the report x_report.html: boom\n"
                                   if not children else "", rc=0))
        return children[-1]
    r = rep.BackgroundReport(launch=launch)
    assert r.maybe_refresh("x", lines.append)            # first: started
    assert not r.maybe_refresh("x", lines.append)        # still running: skipped
    children[0].done = True
    assert r.maybe_refresh("x", lines.append)            # finished: its output logged, a new one started
    assert lines == [" WARNING: could not write the report x_report.html: boom"]
    assert len(children) == 2
    r.close(lines.append, timeout=0.0)                   # still running: stopped, and said so
    assert lines[-1] == " WARNING: could not write the report x_report.html: exit status -15"
    r.close(lines.append)                                # nothing left to wait for
    assert len(lines) == 2
    assert r.maybe_refresh("x", lines.append)
    r.close(lines.append, superseded=True)               # the final page comes next: stopped at once, silently
    assert children[-1].done and children[-1].rc == -15 and len(lines) == 2
    assert r.maybe_refresh("x", lines.append)
    children[-1].done = True
    r.close(lines.append, superseded=True)               # finished before: collected as usual
    assert len(lines) == 2 and len(children) == 4


def test_report_redraw_in_a_child_process_writes_the_page(stopped_run: Path, tmp_path: Path):
    """The real child draws the page of a run at the lowest priority; a root with no run gives the warning."""
    import cryorefine.report as rep
    html = Path(f"{stopped_run}_report.html")
    html.unlink()
    lines: list[str] = []
    r = rep.BackgroundReport()
    assert r.maybe_refresh(str(stopped_run), lines.append)
    r.close(lines.append)
    assert html.exists() and lines == [], lines
    assert not list(stopped_run.parent.glob(".*.tmp*"))
    r.maybe_refresh(str(tmp_path / "none"), lines.append)
    r.close(lines.append)
    assert len(lines) == 1 and "could not write the report" in lines[0] and "none" in lines[0], lines


def test_report_redraw_child_runs_only_on_idle_cores(tmp_path: Path):
    """The background child takes the idle scheduling class where there is one (Linux), and nice 19."""
    import os
    import subprocess
    import sys
    code = ("import os; from cryorefine.report import redraw_child; redraw_child(os.sys.argv[1]); "
            "print(os.sched_getscheduler(0) if hasattr(os, 'SCHED_IDLE') else -1, os.nice(0))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "none")], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()
    assert "could not write the report" in out[0]             # no such run: one warning line, no traceback
    policy, nice = map(int, out[-1].split())
    assert nice == 19 and policy == getattr(os, "SCHED_IDLE", -1)


def test_report_of_a_run_whose_latest_data_star_is_cut_short(stopped_run, tmp_path, capsys):
    """A _data.star cut short (a copy interrupted, a file still being written) was a KeyError traceback."""
    d = tmp_path / "cut"
    shutil.copytree(Path(stopped_run).parent, d)
    data = d / f"{Path(stopped_run).name}_it002_data.star"
    data.write_bytes(data.read_bytes()[:200])
    assert main(["report", str(d / Path(stopped_run).name)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "_it002_data.star: no data_particles table" in err[0]


def _run_copy(stopped_run: Path, dest: Path) -> Path:
    """The run's files (not its report) copied into `dest`; returns the copy's root."""
    for f in stopped_run.parent.glob(f"{stopped_run.name}*"):
        if "report" not in f.name:
            shutil.copy(f, dest / f.name)
    return dest / stopped_run.name


def _without_block(path: Path, block: str) -> None:
    """Remove `data_<block>` (up to the next block) from a STAR file."""
    text = path.read_text()
    start = re.search(rf"^data_{block}\s*$", text, re.M).start()
    end = re.compile(r"^data_", re.M).search(text, start + 1)
    path.write_text(text[:start] + (text[end.start():] if end else ""))


def _without_label(path: Path, label: str) -> None:
    """Remove the line of `_<label>` (a list block's entry) from a STAR file."""
    path.write_text("".join(ln for ln in path.read_text().splitlines(keepends=True)
                            if not ln.startswith(f"_{label} ")))


@pytest.mark.parametrize("name, damage, phrase", [
    ("_it002_half1_model.star", lambda p: _without_block(p, "model_general"), "no data_model_general block"),
    ("_it002_optimiser.star", lambda p: p.write_text(""), "no data_optimiser_general block"),
    ("_it002_sampling.star", lambda p: _without_label(p, "rlnSymmetryGroup"),
     "data_sampling_general has no rlnSymmetryGroup")], ids=["no_model_general", "empty_optimiser", "no_symmetry"])
def test_report_of_a_run_with_a_damaged_latest_star_file_names_it(stopped_run, tmp_path, capsys, name, damage,
                                                                    phrase):
    """A latest-iteration STAR file without a block (or a label) the page's summary reads: a KeyError traceback
    ('model_general', 'optimiser_general'); now one line naming the file and what it lacks, and no page."""
    root = _run_copy(stopped_run, tmp_path)
    damage(Path(f"{root}{name}"))
    capsys.readouterr()
    assert main(["report", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{root}{name}: {phrase} (cut short, or still being written?)" in err[0], err
    assert not list(tmp_path.glob("*report*"))


def test_report_names_a_damaged_earlier_iteration_file_in_its_note(stopped_run, tmp_path):
    """An earlier iteration's model STAR without data_model_general: the page is drawn, and the section it breaks
    says which file lacks which block (it said KeyError: 'model_general')."""
    import json
    root = _run_copy(stopped_run, tmp_path)
    _without_block(Path(f"{root}_it001_half1_model.star"), "model_general")
    assert main(["report", str(root)]) == 0
    errors = json.loads(Path(f"{root}_report.json").read_text())["errors"]
    assert any(f"{root}_it001_half1_model.star: no data_model_general block" in e for e in errors), errors


def test_report_with_a_postprocess_star_without_its_resolution(stopped_run, tmp_path, capsys):
    """--postprocess STAR whose data_general lacks rlnFinalResolution (read by the summary): a KeyError traceback."""
    from cryorefine.io.star import write_star
    root = _run_copy(stopped_run, tmp_path)
    pp = tmp_path / "postprocess.star"
    write_star(pp, {"general": {"rlnMaskName": "None"},
                    "fsc": read_star(f"{root}_it002_half1_model.star")["model_class_1"][["rlnResolution"]]})
    capsys.readouterr()
    assert main(["report", str(root), "--postprocess", str(pp)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{pp}: data_general has no rlnFinalResolution" in err[0], err
