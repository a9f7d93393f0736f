"""RELION STAR files: generic blocks, and particle tables with optics groups (RELION 3.0 files upgraded).

Blocks are keyed by their name without the ``data_`` prefix (``data_optics`` -> ``"optics"``); a loop is a
pandas DataFrame (columns are labels without the leading ``_``, e.g. ``rlnImageName``), a list is a dict.
Numbers are written like RELION: integers as integers, floats with 6 decimals (scientific outside
[1e-3, 1e6)), strings with spaces quoted, empty strings as ``""``.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from cryorefine.errors import InputError, require
from cryorefine.io.atomic import atomic_path
from cryorefine.io.mrc import read_header

STAR_VERSION = "50001"

Block = pd.DataFrame | dict

# labels RELION types as strings (metadata_label.h, EMDL_STRING): "01" stays "01", never the number 1 (names of
# groups, micrographs and files; the tomography, scheme and job-option ones left out)
STRING_LABELS = frozenset("""
    rlnAreaName rlnBodyMaskName rlnBodyReferenceName rlnBodyStarFile rlnComment rlnCtfImage rlnCtfPowerSpectrum
    rlnExperimentalDataStarFile rlnExtReconsDataImag rlnExtReconsDataReal rlnExtReconsResult
    rlnExtReconsResultStarfile rlnExtReconsWeight rlnFourierMask rlnGroupName rlnImageName rlnImageOriginalName
    rlnLocalSymmetryFile rlnMaskName rlnMicrographCoordinates rlnMicrographDefectFile rlnMicrographGainName
    rlnMicrographMetadata rlnMicrographMovieName rlnMicrographName rlnMicrographNameEven rlnMicrographNameNoDW
    rlnMicrographNameOdd rlnModelStarFile rlnModelStarFile2 rlnMtfFileName rlnOpticsGroupName rlnOpticsStarFile
    rlnOrientSamplingStarFile rlnOriginalParticleName rlnOutputRootName rlnParticleName rlnPostprocessedMap
    rlnPostprocessedMapMasked rlnReconstructImageName rlnReferenceImage rlnSolventMask2Name rlnSolventMaskName
    rlnStarFileMovieParticles rlnSubImageStack rlnSubImageStarFile rlnSymmetryGroup rlnTau2FudgeScheme
    rlnTauSpectrumName rlnUnfilteredMapHalf1 rlnUnfilteredMapHalf2
""".split())


# ----------------------------------------------------------------------------------------------------------
# generic reading


def _read_text(path: Path) -> str:
    """The file's text (gzip allowed); InputError for a missing or unreadable file."""
    require(path.exists(), f"{path}: no such file")
    require(path.is_file(), f"{path}: not a file")
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):     # a Windows editor's UTF-16
            return raw.decode("utf-16", errors="replace")
        return raw.decode("utf-8-sig", errors="replace")  # -sig: a byte-order mark is not content
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None


# STAR tokens: a comment (# at a token start), a quoted string (single or double; the closing quote is the
# one followed by whitespace or the end of the line, so 'it's' is one token), a vector [a, b] (may hold
# spaces), or any run of non-blanks.
_TOKEN = re.compile(r"""#[^\n]*|'(?:[^'\n]|'(?=\S))*'(?=\s|$)|"(?:[^"\n]|"(?=\S))*"(?=\s|$)|\[[^\]\n]*\]|\S+""",
                    re.M)
_SPACED_VECTOR = re.compile(r"\[[^\]\n]*\s[^\]\n]*\]")


def tokenize(text: str) -> list[str]:
    """STAR tokens of `text` (comments dropped, quotes kept: see unquote)."""
    return [t for t in _TOKEN.findall(text) if not t.startswith("#")]


def unquote(token: str) -> str:
    """A token without its enclosing quotes ('a b' -> a b, "" -> empty string)."""
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "\"'":
        return token[1:-1]
    return token


def _convert_scalar(token: str, label: str = "") -> int | float | str:
    """A list value as int, float or str (quotes removed; a quoted value, or one of a STRING_LABELS label, stays a
    string)."""
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "\"'":
        return token[1:-1]
    if label in STRING_LABELS:
        return token
    try:
        return int(token)
    except ValueError:
        pass
    try:
        return float(token)
    except ValueError:
        return token


def _numeric_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Convert string columns that hold only numbers (e.g. with 'nan'/'inf') to float (not STRING_LABELS)."""
    for col in df.columns:
        s = df[col]
        if pd.api.types.is_numeric_dtype(s.dtype) or col in STRING_LABELS:
            continue
        try:
            df[col] = pd.to_numeric(s)
        except (ValueError, TypeError):
            pass
    return df


def _needs_tokenizer(text: str) -> bool:
    """True if pandas' C reader (double quotes only) could mis-split the body: single quotes, inline comments,
    empty strings "" (indistinguishable there from a missing value) or vectors with spaces."""
    return "'" in text or "#" in text or '""' in text or ("[" in text and _SPACED_VECTOR.search(text) is not None)


def _first_bad_row(lines: list[str], ncols: int) -> int:
    """Index of the first body line whose token count is not `ncols` (for the error message)."""
    for k, line in enumerate(lines):
        if len(tokenize(line)) != ncols:
            return k
    return len(lines) - 1


def _parse_loop_tokens(path: Path, name: str, labels: list[str], lines: list[str], first_line: int) -> pd.DataFrame:
    """A loop body with quotes / comments / spaced vectors: tokenised, then columns converted one by one."""
    tokens = tokenize("\n".join(lines))
    ncols = len(labels)
    if len(tokens) % ncols:
        row = _first_bad_row(lines, ncols)
        raise InputError(f"{path}: data_{name} loop row {row + 1} (line {first_line + row}) does not have "
                         f"{ncols} values")
    columns = {}
    for j, lab in enumerate(labels):
        col = tokens[j::ncols]
        if lab in STRING_LABELS or any(t[:1] in "\"'" for t in col):
            columns[lab] = pd.Series([unquote(t) for t in col], dtype=object)   # quoted or a name: text
            continue
        series = pd.Series(col, dtype=object)
        try:
            columns[lab] = pd.to_numeric(series)
        except (ValueError, TypeError):
            columns[lab] = series
    df = pd.DataFrame(columns)
    return df


def _parse_loop(path: Path, name: str, labels: list[str], lines: list[str], first_line: int) -> pd.DataFrame:
    """The body lines of one loop -> DataFrame with `labels` as columns (types inferred).

    Plain bodies (double-quoted strings allowed) go through pandas' C reader (fast for millions of rows);
    bodies with single quotes, empty strings, inline comments or vectors with spaces through the STAR tokenizer.
    """
    if not lines:
        return pd.DataFrame({lab: pd.Series(dtype=float) for lab in labels})
    text = "\n".join(lines)
    if _needs_tokenizer(text):
        return _parse_loop_tokens(path, name, labels, lines, first_line)
    try:
        df = pd.read_csv(io.StringIO(text), sep=r"\s+", header=None, names=labels, index_col=False,
                         keep_default_na=False, na_values=[], quotechar='"',
                         dtype={lab: str for lab in labels if lab in STRING_LABELS} or None, engine="c")
    except (pd.errors.ParserError, ValueError) as exc:
        row = _first_bad_row(lines, len(labels))
        if len(tokenize(lines[row])) != len(labels):
            raise InputError(f"{path}: data_{name} loop row {row + 1} (line {first_line + row}) does not have "
                             f"{len(labels)} values") from None
        msg = str(exc).splitlines()[-1] if str(exc) else "unreadable"
        raise InputError(f"{path}: data_{name} loop (from line {first_line}): {msg}") from None
    require(len(df) == len(lines), f"{path}: data_{name} loop (from line {first_line}): unreadable rows")
    # a row with fewer values than labels shows up as empty strings (no "" here, so no real empty values)
    for col in df.columns:
        s = df[col]
        if not pd.api.types.is_numeric_dtype(s.dtype):
            empty = (s == "").to_numpy()
            if empty.any():
                row = int(np.argmax(empty))
                raise InputError(f"{path}: data_{name} loop row {row + 1} (line {first_line + row}) has fewer "
                                 f"than {len(labels)} values")
    return _numeric_columns(df)


def read_star(path) -> dict[str, Block]:
    """All blocks of a STAR file, in file order: name (without 'data_') -> DataFrame (loop) or dict (list)."""
    path = Path(path)
    text = _read_text(path)
    blocks: dict[str, Block] = {}
    lines = text.splitlines()
    n = len(lines)
    i = 0
    current: str | None = None
    while i < n:
        line = lines[i].strip()
        if not line or line.startswith("#"):
            i += 1
            continue
        if line.startswith("data_"):
            current = line[5:].split()[0] if len(line) > 5 else ""
            # RELION would read the first and ignore the rest: which one was meant is the user's to say
            require(current not in blocks, f"{path}: line {i + 1}: a second data_{current} block")
            blocks[current] = {}
            i += 1
            continue
        require(current is not None, f"{path}: line {i + 1}: content before any data_ block")
        if line.startswith("loop_"):
            loop_line = i + 1
            i += 1
            labels: list[str] = []
            while i < n:
                s = lines[i].strip()
                if not s or s.startswith("#"):
                    i += 1
                    continue
                if s.startswith("_"):
                    labels.append(s.split()[0][1:])
                    i += 1
                    continue
                break
            require(len(labels) > 0, f"{path}: data_{current}: loop_ without labels")
            require(len(set(labels)) == len(labels), f"{path}: data_{current}: repeated label in loop")
            first = i + 1
            body: list[str] = []
            while i < n:
                s = lines[i].strip()
                if s.startswith("data_") or s.startswith("loop_") or s.startswith("_"):
                    break
                if s and not s.startswith("#"):
                    body.append(s)
                i += 1
            # RELION reads one loop per block (metadata_table.cpp) and would drop the rest without a word
            require(not isinstance(blocks[current], pd.DataFrame),
                    f"{path}: line {loop_line}: a second loop_ in data_{current} (one loop per block; join the rows "
                    f"into one loop)")
            blocks[current] = _parse_loop(path, current, labels, body, first)
            continue
        if line.startswith("_"):
            block = blocks[current]
            require(isinstance(block, dict), f"{path}: line {i + 1}: key/value after a loop in data_{current}")
            parts = line.split(None, 1)
            key = parts[0][1:]
            values = tokenize(parts[1]) if len(parts) == 2 else []
            require(len(values) > 0, f"{path}: line {i + 1}: label _{key} has no value")
            block[key] = _convert_scalar(values[0], key)
            i += 1
            continue
        raise InputError(f"{path}: line {i + 1}: unexpected text {line[:40]!r}")
    return blocks


# ----------------------------------------------------------------------------------------------------------
# generic writing


def _format_floats(x: np.ndarray) -> list[str]:
    """RELION-like float text: '%.6f', or '%.6e' for 0 < |x| < 1e-3 or |x| >= 1e6 (and for nan/inf)."""
    out = [f"{v:.6f}" for v in x.tolist()]
    a = np.abs(x)
    odd = ~(np.isfinite(x) & ((a == 0) | ((a >= 1e-3) & (a < 1e6))))
    for i in np.flatnonzero(odd).tolist():
        v = float(x[i])
        out[i] = f"{v:.6e}" if np.isfinite(v) else str(v)
    return out


_NEEDS_QUOTE = re.compile(r"\s|(?:^|\x00)(?:_|#|data_|loop_|\"|'|\x00|$)")


def _format_strings(values: list) -> list[str]:
    """Column of strings as STAR tokens; quoting checked on the joined column first (fast common case)."""
    values = [str(v) if v is not None else "" for v in values]
    if not values or _NEEDS_QUOTE.search("\x00".join(values)) is None:
        return values
    return [_quote(v) for v in values]


def _quote(s: str) -> str:
    """A STAR token for a string: quoted when empty or holding whitespace."""
    if s == "":
        return '""'
    if any(c.isspace() for c in s) or s.startswith(("_", "#", "data_", "loop_", '"', "'")):
        return f'"{s}"'
    return s


def _format_column(s: pd.Series) -> list[str]:
    """Every value of one column as STAR text."""
    dt = s.dtype
    if pd.api.types.is_bool_dtype(dt):
        return s.astype(np.int64).astype(str).tolist()
    if pd.api.types.is_integer_dtype(dt):
        return s.astype(str).tolist()
    if pd.api.types.is_float_dtype(dt):
        return _format_floats(s.to_numpy(dtype=np.float64))
    values = s.tolist()
    if all(isinstance(v, str) for v in values):
        return _format_strings(values)
    return [_format_value(v) for v in values]


def _format_value(v) -> str:
    """One value (list entry or object-column cell) as STAR text."""
    if isinstance(v, (bool, np.bool_)):
        return str(int(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return _format_floats(np.array([float(v)]))[0]
    if v is None:
        return '""'
    return _quote(str(v))


def _block_text(name: str, block: Block) -> str:
    """One block, RELION layout: version line, data_ line, then list or loop."""
    parts = [f"\n# version {STAR_VERSION}\n\ndata_{name}\n\n"]
    if isinstance(block, dict):
        width = max((len(k) for k in block), default=0) + 1
        for k, v in block.items():
            parts.append(f"_{k:<{width}} {_format_value(v)}\n")
        parts.append("\n")
        return "".join(parts)
    require(isinstance(block, pd.DataFrame), f"data_{name}: a block must be a DataFrame or dict")
    parts.append("loop_ \n")
    for j, col in enumerate(block.columns, start=1):
        parts.append(f"_{col} #{j} \n")
    if len(block):
        cols = [_format_column(block[c]) for c in block.columns]
        parts.append("\n".join(" ".join(row) for row in zip(*cols)))
        parts.append("\n")
    parts.append("\n")
    return "".join(parts)


def star_text(blocks: dict[str, Block], comment: str = "") -> str:
    """Blocks (name without 'data_' -> DataFrame loop or dict list) as STAR text, RELION layout; `comment` (lines
    starting with '#') at the top, as in RELION's _optimiser.star."""
    return comment + "".join(_block_text(name, block) for name, block in blocks.items())


def write_star(path, blocks: dict[str, Block], comment: str = "") -> None:
    """Write star_text(blocks, comment) atomically."""
    path = Path(path)
    text = star_text(blocks, comment)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ----------------------------------------------------------------------------------------------------------
# particle tables


@dataclass
class ParticleTable:
    """A RELION 3.1+ particle table: one optics row per group, particles with every original column."""

    optics: pd.DataFrame
    particles: pd.DataFrame
    path: Path = field(default_factory=lambda: Path("particles.star"))
    version: str = ""  # '# version' of the file read ('30001', '50001'), '3.0' for an upgraded old file
    notes: tuple[str, ...] = ()   # what reading changed, for the jobs' logs (e.g. pixel origins made Å)

    @property
    def nr_particles(self) -> int:
        """Number of particle rows."""
        return len(self.particles)

    @property
    def directory(self) -> Path:
        """Folder of the STAR file (image names fall back to being relative to it)."""
        return Path(self.path).resolve().parent


# per-particle columns of a RELION 3.0 file that become optics-group columns (star_converter.cpp: the groups are the
# distinct combinations, the beam tilt included)
_LEGACY_OPTICS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnBeamTiltX", "rlnBeamTiltY")


def _file_version(path: Path) -> str:
    """The number of the first '# version NNNNN' line, or ''."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:2] == b"\x1f\x8b":
        return ""
    m = re.search(rb"#\s*version\s+(\d+)", head)
    return m.group(1).decode() if m else ""


def _parse_image_name(name: str) -> tuple[int, str]:
    """'000012@Stacks/a.mrcs' -> (12, 'Stacks/a.mrcs'); a name without '@' is image 1 of that file."""
    if "@" in name:
        idx, _, fname = name.partition("@")
        return int(idx), fname
    return 1, name


def resolve_image_path(fname: str, star_dir: Path) -> Path:
    """An image file name from a STAR file: relative to the current directory (RELION's project folder), else to
    the STAR's folder or one of its parents (a RELION project's file read from elsewhere: its names start at the
    project folder, a parent of Job/jobNNN/)."""
    p = Path(fname)
    if p.is_absolute() or p.exists():
        return p
    for base in (star_dir, *star_dir.parents):
        if (base / p).exists():
            return base / p
    return p


def _name_from_here(resolved: Path) -> str:
    """A found image file as a name that opens from the current folder: relative when it lies below it, else absolute
    (RELION, cryoDRGN and cryoSPARC open image names from the current folder)."""
    rel = os.path.relpath(resolved)
    return rel if not rel.startswith("..") else str(resolved.resolve())


def _names_from_here(path: Path, parts: pd.DataFrame) -> pd.DataFrame:
    """Image names that open only from the STAR file's folder (or a parent of it) rewritten to open from the current
    folder, so that every STAR file written from this table (a refinement's _data.star) names images its readers
    find; names that open as they are, or not at all, stay as they are."""
    names = parts["rlnImageName"].astype(str)
    has_at = names.str.contains("@", regex=False)
    split = names.str.partition("@")
    files = split[2].where(has_at, names)
    star_dir = path.resolve().parent
    renamed = {}
    for f in pd.unique(files):
        p = Path(f)
        if f and not p.is_absolute() and not p.exists():
            found = resolve_image_path(f, star_dir)
            if found.exists():
                renamed[f] = _name_from_here(found)
    if not renamed:
        return parts
    parts = parts.copy()
    parts["rlnImageName"] = (split[0] + "@").where(has_at, "") + files.map(lambda f: renamed.get(f, f))
    return parts


def _legacy_box(path: Path, particles: pd.DataFrame) -> int | None:
    """Image size of a RELION 3.0 file (it has no optics table): from rlnImageSize, else the first stack's
    header, else None (metadata can be read without the stacks; the box is found when images are read)."""
    if "rlnImageSize" in particles:
        sizes = pd.to_numeric(particles["rlnImageSize"], errors="coerce").to_numpy(dtype=np.float64)
        if sizes.size and np.all(sizes == sizes[0]) and sizes[0] > 0:
            return int(sizes[0])
    _, first_name = _parse_image_name(str(particles["rlnImageName"].iloc[0]))
    stack = resolve_image_path(first_name, path.resolve().parent)
    if not stack.is_file():
        return None
    try:
        return int(read_header(stack).shape[-1])
    except InputError as exc:
        raise InputError(f"{path}: RELION 3.0 file: cannot read the image size from the first stack ({exc})") from None


def _upgrade_legacy(path: Path, particles: pd.DataFrame, angpix: float | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RELION 3.0 table -> (optics, particles): pixel origins to Å, CTF optics into groups (relion_convert_star)."""
    n = len(particles)
    if angpix is not None:
        require(angpix > 0, f"--angpix: pixel size must be > 0 (got {angpix})")
        pix = np.full(n, float(angpix))
    elif "rlnDetectorPixelSize" in particles and "rlnMagnification" in particles:
        det = particles["rlnDetectorPixelSize"].to_numpy(dtype=np.float64)
        mag = particles["rlnMagnification"].to_numpy(dtype=np.float64)
        require(bool(np.all(mag > 0)), f"{path}: rlnMagnification must be > 0")
        pix = 1e4 * det / mag
    elif "rlnImagePixelSize" in particles:
        pix = particles["rlnImagePixelSize"].to_numpy(dtype=np.float64)
    else:
        raise InputError(f"{path}: RELION 3.0 file without a pixel size "
                         "(no rlnDetectorPixelSize/rlnMagnification): give --angpix")
    require(bool(np.all(np.isfinite(pix) & (pix > 0))), f"{path}: pixel size must be > 0")
    pix = np.round(pix, 6)

    parts, _ = _angstrom_origins(particles, pix)

    keys = {lab: parts[lab].to_numpy(dtype=np.float64) for lab in _LEGACY_OPTICS if lab in parts}
    keys["rlnImagePixelSize"] = pix
    key_df = pd.DataFrame(keys)
    groups = key_df.drop_duplicates().reset_index(drop=True)
    group_of = key_df.merge(groups.reset_index(), how="left", on=list(keys))["index"].to_numpy() + 1

    box = _legacy_box(path, parts)

    optics = pd.DataFrame({
        "rlnOpticsGroupName": [f"opticsGroup{g + 1}" for g in range(len(groups))],
        "rlnOpticsGroup": np.arange(1, len(groups) + 1, dtype=np.int64),
    })
    for lab in keys:
        optics[lab] = groups[lab].to_numpy()
    if box is not None:
        optics["rlnImageSize"] = box
    optics["rlnImageDimensionality"] = 2
    drop = [c for c in (*_LEGACY_OPTICS, "rlnDetectorPixelSize", "rlnMagnification", "rlnImagePixelSize",
                        "rlnImageSize")
            if c in parts]
    parts = parts.drop(columns=drop)
    parts["rlnOpticsGroup"] = group_of.astype(np.int64)
    return optics, parts


def read_particles(path, angpix: float | None = None) -> ParticleTable:
    """Read a particle STAR (RELION 3.1+, or 3.0 upgraded to 3.1 layout); validates what refinement needs."""
    path = Path(path)
    blocks = read_star(path)
    optics = blocks.get("optics")
    if isinstance(optics, dict) and optics:     # one group written as a key/value list, which RELION also reads
        optics = pd.DataFrame([optics])
    parts = blocks.get("particles")
    legacy = False
    if optics is None:
        # RELION 3.0: one loop holding everything, unnamed, 'images' or 'particles'; converted as RELION's
        # ObservationModel::loadSafely does whenever a file has no optics table
        loops = [k for k, b in blocks.items() if isinstance(b, pd.DataFrame) and k in ("", "images")]
        if parts is None and loops:
            parts = blocks[loops[0]]
        legacy = isinstance(parts, pd.DataFrame)
    require(parts is not None, f"{path}: no data_particles table")
    require(isinstance(parts, pd.DataFrame), f"{path}: data_particles is not a loop")
    require("rlnImageName" in parts.columns, f"{path}: data_particles has no rlnImageName column")
    require(len(parts) > 0, f"{path}: data_particles is empty")
    parts = _names_from_here(path, parts.reset_index(drop=True))

    if legacy:
        optics, parts = _upgrade_legacy(path, parts, angpix)
        version = "3.0"
    else:
        version = _file_version(path)
        require(isinstance(optics, pd.DataFrame), f"{path}: no data_optics table (RELION 3.1+ files need one)")
        require(len(optics) > 0, f"{path}: data_optics is empty (no optics group)")
        optics = optics.reset_index(drop=True)
        require("rlnOpticsGroup" in optics.columns, f"{path}: data_optics has no rlnOpticsGroup column")
        if "rlnOpticsGroup" not in parts.columns:
            require(len(optics) == 1, f"{path}: data_particles has no rlnOpticsGroup column")
            parts["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
        if "rlnImagePixelSize" not in optics.columns:
            require(angpix is not None, f"{path}: data_optics has no rlnImagePixelSize (give --angpix)")
            optics["rlnImagePixelSize"] = float(angpix)
        pix = pd.to_numeric(optics["rlnImagePixelSize"], errors="coerce").to_numpy(dtype=np.float64)
        require(bool(np.all(np.isfinite(pix) & (pix > 0))), f"{path}: rlnImagePixelSize must be > 0")
        groups = optics["rlnOpticsGroup"].to_numpy()
        require(len(set(groups.tolist())) == len(groups), f"{path}: data_optics repeats an rlnOpticsGroup")
        used = pd.unique(parts["rlnOpticsGroup"])
        missing = sorted(set(used.tolist()) - set(groups.tolist()))
        if missing:
            raise InputError(f"{path}: optics group {missing[0]} used in data_particles but not defined in data_optics")
        parts, notes = _pixel_origins_in_angstrom(path, optics, parts)
        return ParticleTable(optics=optics, particles=parts, path=path, version=version, notes=notes)
    return ParticleTable(optics=optics, particles=parts, path=path, version=version)


def _angstrom_origins(parts: pd.DataFrame, pix: NDArray) -> tuple[pd.DataFrame, list[str]]:
    """A copy with rlnOrigin{X,Y,Z} (pixels) replaced by rlnOrigin{X,Y,Z}Angst = value × pix (per particle), where
    no Å column exists already; returns the table and the axes converted."""
    parts = parts.copy()
    axes = []
    for a in ("X", "Y", "Z"):
        old = f"rlnOrigin{a}"
        if old in parts and f"{old}Angst" not in parts:
            loc = parts.columns.get_loc(old)
            values = pd.to_numeric(parts[old], errors="coerce").to_numpy(np.float64) * pix
            parts = parts.drop(columns=[old])
            parts.insert(loc, f"{old}Angst", values)
            axes.append(a)
    return parts, axes


def _pixel_origins_in_angstrom(path: Path, optics: pd.DataFrame, parts: pd.DataFrame
                               ) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """A RELION 3.1+ table with origins only in pixels (rlnOriginX/Y, a hand edit or an old exporter): the Å columns
    from each particle's rlnImagePixelSize. RELION reads only rlnOriginXAngst there and would drop the shifts."""
    if not any(f"rlnOrigin{a}" in parts and f"rlnOrigin{a}Angst" not in parts for a in ("X", "Y", "Z")):
        return parts, ()
    pix = pd.to_numeric(optics["rlnImagePixelSize"]).to_numpy(np.float64)[
        optics_row_index(ParticleTable(optics, parts, path))]
    parts, axes = _angstrom_origins(parts, pix)
    return parts, (f"{path}: origins given in pixels only (rlnOrigin{'/'.join(axes)}); converted to Å with each "
                   f"particle's rlnImagePixelSize (RELION 3.1+ reads only rlnOrigin{axes[0]}Angst and would ignore "
                   f"them)",)


def write_particles(path, table: ParticleTable, extra_blocks: dict[str, Block] | None = None) -> None:
    """Write a ParticleTable in RELION 3.1+ layout (data_optics, data_particles; every column, row order kept)."""
    blocks: dict[str, Block] = {}
    if extra_blocks:
        blocks.update(extra_blocks)
    blocks["optics"] = table.optics
    blocks["particles"] = table.particles
    write_star(path, blocks)


def optics_row_index(table: ParticleTable) -> np.ndarray:
    """Per particle: the row position in table.optics of its optics group."""
    groups = table.optics["rlnOpticsGroup"].to_numpy()
    lookup = pd.Series(np.arange(len(groups)), index=groups)
    pos = lookup.reindex(table.particles["rlnOpticsGroup"].to_numpy()).to_numpy()
    if np.any(pd.isna(pos)):
        bad = table.particles["rlnOpticsGroup"].to_numpy()[pd.isna(pos)][0]
        raise InputError(f"{table.path}: optics group {bad} used in data_particles but not defined in data_optics")
    return pos.astype(np.int64)


def particle_optics(table: ParticleTable, label: str) -> np.ndarray:
    """Per-particle value of an optics-table column (e.g. rlnImagePixelSize), via each particle's group."""
    if label not in table.optics.columns:
        if label in table.particles.columns:
            return table.particles[label].to_numpy()
        raise InputError(f"{table.path}: data_optics has no {label} column")
    return table.optics[label].to_numpy()[optics_row_index(table)]


def merge_particles(tables: list[ParticleTable], path=None) -> ParticleTable:
    """Concatenate particle tables; optics groups renumbered 1..G in order (names made unique), rows kept."""
    require(len(tables) > 0, "merge_particles: no tables")
    optics_parts, particle_parts = [], []
    next_group = 1
    names: set[str] = set()
    for t in tables:
        old = t.optics["rlnOpticsGroup"].to_numpy()
        new = np.arange(next_group, next_group + len(old), dtype=np.int64)
        next_group += len(old)
        o = t.optics.copy()
        o["rlnOpticsGroup"] = new
        if "rlnOpticsGroupName" in o:
            fixed = []
            for nm, g in zip(o["rlnOpticsGroupName"].astype(str), new):
                fixed.append(nm if nm not in names else f"opticsGroup{g}")
                names.add(fixed[-1])
            o["rlnOpticsGroupName"] = fixed
        p = t.particles.copy()
        p["rlnOpticsGroup"] = pd.Series(new, index=old).reindex(p["rlnOpticsGroup"].to_numpy()).to_numpy()
        optics_parts.append(o)
        particle_parts.append(p)
    optics = pd.concat(optics_parts, ignore_index=True)
    particles = pd.concat(particle_parts, ignore_index=True)
    return ParticleTable(optics=optics, particles=particles,
                         path=Path(path) if path is not None else tables[0].path, version=tables[0].version)


# ----------------------------------------------------------------------------------------------------------
# optics aberrations (RELION 3.1+ ObservationModel labels)

ABERRATION_LABELS = ("rlnBeamTiltX", "rlnBeamTiltY", "rlnOddZernike", "rlnEvenZernike",
                     "rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")


def format_star_vector(values) -> str:
    """A vector as one STAR value '[c0,c1,...]' (MetaDataTable's format, 12 significant digits)."""
    return "[" + ",".join(f"{float(v):.12g}" for v in values) + "]"


def parse_star_vector(value, where: str) -> tuple[float, ...]:
    """A RELION vector value '[c0,c1,...]' (MetaDataTable's format; spaces allowed) as a tuple of floats."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        if np.isnan(value):
            return ()
        return (float(value),)
    text = str(value).strip()
    require(text.startswith("[") and text.endswith("]"), f"{where}: expected a vector '[c0,c1,...]', got {text!r}")
    body = text[1:-1].strip()
    if not body:
        return ()
    try:
        return tuple(float(t) for t in body.replace(" ", ",").split(",") if t != "")
    except ValueError:
        raise InputError(f"{where}: expected a vector of numbers '[c0,c1,...]', got {text!r}") from None


def optics_models(table: ParticleTable, boxes: dict[int, int] | None = None) -> dict:
    """rlnOpticsGroup -> fourier.aberrations.OpticsModel of each optics row: box, pixel size, beam tilt (inserted
    into the odd Zernike coefficients as TiltHelper::insertTilt), rlnOddZernike, rlnEvenZernike, rlnMagMat00..11,
    rlnCtfDataAreCtfPremultiplied and rlnCtfDataArePhaseFlipped (absent labels: no aberration, flags 0).

    `boxes` (rlnOpticsGroup -> size of its images) overrides rlnImageSize."""
    from cryorefine.fourier.aberrations import IDENTITY, OpticsModel, insert_beam_tilt

    opt = table.optics
    cols = set(opt.columns)
    out = {}
    has_tilt = "rlnBeamTiltX" in cols or "rlnBeamTiltY" in cols
    has_mag = any(f"rlnMagMat{i}{j}" in cols for i in (0, 1) for j in (0, 1))
    for r in range(len(opt)):
        row = opt.iloc[r]
        g = int(row["rlnOpticsGroup"])
        where = f"{table.path}: data_optics group {g}"

        def num(label: str, default: float, row=row, where=where) -> float:
            if label not in cols:
                return default
            try:
                v = float(row[label])
            except (TypeError, ValueError):
                raise InputError(f"{where}: {label} is not a number ({row[label]!r})") from None
            require(np.isfinite(v), f"{where}: {label} is not finite")
            return v

        if boxes is not None and g in boxes:
            box = int(boxes[g])
        elif "rlnImageSize" in cols:
            box = int(num("rlnImageSize", 0))
        else:
            continue        # a group no particle uses, without a size: nothing to model
        angpix = num("rlnImagePixelSize", 0.0)
        require(box > 0 and angpix > 0, f"{where}: image size and pixel size must be > 0")
        odd = parse_star_vector(row["rlnOddZernike"], f"{where}: rlnOddZernike") if "rlnOddZernike" in cols else ()
        even = parse_star_vector(row["rlnEvenZernike"], f"{where}: rlnEvenZernike") if "rlnEvenZernike" in cols else ()
        if has_tilt:
            if not odd:
                odd = (0.0,) * 6
            odd = insert_beam_tilt(odd, num("rlnBeamTiltX", 0.0), num("rlnBeamTiltY", 0.0),
                                   num("rlnSphericalAberration", 0.0), num("rlnVoltage", 300.0))
        mag = IDENTITY
        if has_mag:
            mag = (num("rlnMagMat00", 1.0), num("rlnMagMat01", 0.0), num("rlnMagMat10", 0.0), num("rlnMagMat11", 1.0))
            require(abs(mag[0] * mag[3] - mag[1] * mag[2]) > 1e-6, f"{where}: the magnification matrix is singular")
        out[g] = OpticsModel(box=box, angpix=angpix, odd=odd, even=even, mag=mag,
                             premultiplied=num("rlnCtfDataAreCtfPremultiplied", 0.0) > 0,
                             phase_flipped=num("rlnCtfDataArePhaseFlipped", 0.0) > 0)
    return out
