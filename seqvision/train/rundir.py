"""The run directory: made, claimed and cleaned up so that nothing of the user's or of another run is lost.

A run marks its folder with ``.seqvision-run`` and holds an exclusive lock on that file while it writes there
(released by the operating system however the process ends), so a second run into the same folder is refused.
Only the files a run writes are ever replaced, and only in a folder that a run marked.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import IO

from ..errors import ConfigError, OutputError

try:
    import fcntl
except ImportError:  # no advisory locks (Windows): runs are not protected from each other there
    fcntl = None  # type: ignore[assignment]

MARKER = ".seqvision-run"
RUN_FILES = ("last.pth", "best.pth", "metrics.csv", "summary.json", "log.txt", "curves.png")
RUN_DIRS = ("tensorboard",)


class RunDir:
    """``path`` claimed for one run (``claim``) until ``release``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock: IO[str] | None = None

    def claim(self, resuming: bool, overwrite: bool) -> list[str]:
        """Create and lock the folder, and make it ready: for a new run, clear a previous run's files (only
        with ``overwrite`` when that run has a checkpoint). Returns the stale temporary files it removed."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--output {p} is a file: give a folder for the run")
        ours = (p / MARKER).exists() or (p / "last.pth").exists()
        if not resuming and not ours:
            foreign = [n for n in (*RUN_FILES, *RUN_DIRS) if (p / n).exists()]
            if foreign:
                raise ConfigError(f"{p} holds a {foreign[0]} that no seqvision run wrote: choose another --output")
        if not resuming and (p / "last.pth").exists() and not overwrite:
            raise ConfigError(f"{p} already holds a run: --resume {p} continues it, --overwrite replaces it")
        try:
            p.mkdir(parents=True, exist_ok=True)
            self._lock = open(p / MARKER, "a+")  # noqa: SIM115 - held open for the run's lifetime
        except OSError as e:
            raise OutputError(f"cannot write to {p}: {e.strerror or e}") from None
        self._take_lock()
        if not resuming:
            for name in RUN_FILES:
                (p / name).unlink(missing_ok=True)
        return self._remove_stale_temporaries()

    def _take_lock(self) -> None:
        assert self._lock is not None
        if fcntl is not None:
            try:
                fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock.seek(0)
                holder = self._lock.read().strip() or "another process"
                self._lock.close()
                self._lock = None
                raise ConfigError(
                    f"{self.path} is in use by another run ({holder}): wait for it to end or choose another --output"
                ) from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._lock.flush()

    def _remove_stale_temporaries(self) -> list[str]:
        # What an interrupted atomic write leaves: ".<name>.<random>.tmp<suffix>" (seqvision.files.atomic_write).
        stale = [f for n in RUN_FILES for f in self.path.glob(f".{n}.*.tmp*") if f.is_file()]
        for f in stale:
            f.unlink(missing_ok=True)
        return [f.name for f in stale]

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the lock
            self._lock = None
