"""Running the study's training runs: one progress bar over the whole study, and worker processes for
``--jobs`` (small models train faster as several single-threaded processes than as one multi-threaded one)."""

from __future__ import annotations

import multiprocessing
import queue
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm


class Progress:
    """One bar over the whole study on a terminal (tqdm), one line per finished step otherwise."""

    def __init__(self, total: int, enabled: bool | None = None, stream: Any = None):
        self.stream = stream or sys.stderr
        self.bar = None
        if enabled if enabled is not None else self.stream.isatty():
            self.bar = tqdm(total=total, file=self.stream, unit="step", dynamic_ncols=True)

    def step(self, desc: str, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.set_description_str(desc)
            self.bar.update(n)

    def note(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class QueuedProgress:
    """A worker's side of the progress bar: every step and note goes to the parent over a queue."""

    def __init__(self, messages: Any):
        self.messages = messages

    def step(self, desc: str, n: int = 1) -> None:
        self.messages.put(("step", desc, n))

    def note(self, line: str) -> None:
        self.messages.put(("note", line, 0))


_WORKER: dict[str, Any] = {}


def worker_progress() -> QueuedProgress:
    """The progress bar of the worker process this runs in."""
    return _WORKER["progress"]


def _start_worker(messages: Any, threads: int) -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it, and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    _WORKER["progress"] = QueuedProgress(messages)


def _timed(fn: Callable[..., dict[str, Any]], *args: Any) -> tuple[dict[str, Any], float]:
    cpu_start = time.process_time()
    return fn(*args), time.process_time() - cpu_start


def run_in_workers(
    fn: Callable[..., dict[str, Any]], calls: Sequence[tuple], jobs: int, threads: int, bar: Progress
) -> tuple[list[dict[str, Any]], float]:
    """``fn(*call)`` for every call in up to ``jobs`` worker processes with ``threads`` torch threads each;
    their results in the order of ``calls`` and the workers' CPU seconds. The first failure (or Ctrl-C) stops
    every worker and is raised here. ``fn`` must be a module-level function (it is pickled by name)."""
    ctx = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools in an unknown state
    messages = ctx.Queue()
    pool = ctx.Pool(min(jobs, len(calls)), initializer=_start_worker, initargs=(messages, threads))
    try:
        pending = [pool.apply_async(_timed, (fn, *call)) for call in calls]
        while True:
            finished = all(p.ready() for p in pending)
            failed = any(p.ready() and not p.successful() for p in pending)
            try:
                while True:
                    kind, text, n = messages.get(timeout=0.2)
                    bar.step(text, n) if kind == "step" else bar.note(text)
            except queue.Empty:
                pass
            if finished or failed:
                break
        done = [p.get() for p in pending]  # raises the first failure
        pool.close()
    except BaseException:
        pool.terminate()  # the other runs stop too; their checkpoints stay resumable
        raise
    finally:
        pool.join()
    return [d for d, _ in done], sum(cpu for _, cpu in done)
