"""Atomic output files: write to a temporary name in the same folder, rename on success."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary name keeps the real suffix (or `suffix`) so libraries that look at
    extensions (mrcfile, starfile) behave the same. On any exception the temporary file
    is removed and nothing is left at `path`.
    """
    path = Path(path)
    created = _missing_folders(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    sfx = suffix if suffix is not None else "".join(path.suffixes[-1:])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + sfx, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files; outputs get the usual 0666 & ~umask like any other file
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        _remove_if_empty(created)
        if exc.filename is None or exc.filename == str(tmp_path):
            # a failed write names no file (a full disk): the error line must name the output, not a temporary
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        _remove_if_empty(created)
        raise


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and its parents that do not exist yet, deepest first."""
    out = []
    while not folder.exists() and folder.parent != folder:
        out.append(folder)
        folder = folder.parent
    return out


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders a failed write made (deepest first), unless something else was put in them meanwhile."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (UTF-8) through atomic_path."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def stale_temporaries(root: str | os.PathLike, kinds: tuple[str, ...]) -> list[Path]:
    """The temporary files atomic_path left when a process was killed while writing the outputs `<root>_<kind>...`
    or `<root>_itNNN_<kind>...` (hidden `.<name>.<random>.tmp<suffix>`); not those of another root that begins
    with this one (`run_ct10_...` beside `run_...`)."""
    root = Path(root)
    if not root.parent.is_dir():
        return []
    own = re.compile(rf"\.{re.escape(root.name)}(_it\d{{3,}})?_({'|'.join(map(re.escape, kinds))})[^/]*\.tmp[^/]*")
    return sorted(p for p in root.parent.glob(f".{glob.escape(root.name)}_*.tmp*") if own.fullmatch(p.name)
                  and p.is_file())
