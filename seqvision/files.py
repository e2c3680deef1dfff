"""Writing results: every file appears whole or not at all, with the permissions the user's umask gives."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OutputError


def _reason(e: OSError) -> str:
    if e.strerror:
        return e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it onto ``path``.

    A crash or a full disk never leaves a half-written file: ``path`` keeps its old content and the temporary
    file is removed. An OSError becomes an OutputError that names ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "is a directory")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {_reason(e)}") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results follow the umask like any other
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(f"cannot write {path}: {_reason(e)}") from None
        raise
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, os.PathLike)):
        return os.fspath(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON (numpy values and paths converted), written atomically."""
    text = json.dumps(obj, indent=2, default=_json_default, allow_nan=True) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """``rows`` as CSV with the union of their keys as columns (first-seen order), written atomically."""
    fields = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, write)
