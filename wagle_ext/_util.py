"""Loop plumbing shared by the layers that run a model over data (attribution, evaluation): the
model's device, moving a batch there, and an optional progress bar. Imports nothing from
``wagle_ext`` (bottom layer)."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch

__all__ = ["model_device", "progress", "progress_line", "to_device"]


def model_device(model: Any) -> torch.device:
    """Device of ``model``: its ``device`` attribute when it has one (Hugging Face models), else
    its first parameter's, else CPU."""
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    for p in model.parameters() if hasattr(model, "parameters") else ():
        return p.device
    return torch.device("cpu")


def to_device(batch: Mapping, device: torch.device) -> dict:
    """The batch dict with every tensor moved to ``device`` (non-blocking); other values as they are."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def progress(iterable: Iterable, *, enabled: bool, desc: str, total: Optional[int] = None,
             every_s: float = 30.0) -> Iterable:
    """``iterable`` with progress reports when ``enabled``, else ``iterable`` itself.

    On a terminal (stderr is a TTY) a tqdm bar; otherwise (a log file, a pipe, a batch job) one plain
    line on stderr at the first item, then at most every ``every_s`` seconds and at the end:
    ``desc: 40/120 (33%) 12.0 s elapsed, ETA 24.0 s`` -- no carriage returns to garble a log (to
    :data:`progress_sink` when set).
    ``total`` defaults to ``len(iterable)`` when it has one (else no percentage or ETA)."""
    if not enabled:
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is a dependency, but do not fail a run over a progress bar
            pass
        else:
            return tqdm(iterable, desc=desc, total=total, leave=False)
    return _progress_lines(iterable, desc, total, every_s)


def progress_line(desc: str, done: int, total: Optional[int], elapsed: float) -> str:
    """``desc: done/total (pct%) elapsed s elapsed, ETA s`` (without total: ``desc: done, elapsed``)."""
    if total:
        eta = elapsed / done * (total - done) if done else float("nan")
        return (f"{desc}: {done}/{total} ({100.0 * done / total:.0f}%) {elapsed:.1f} s elapsed, "
                f"ETA {eta:.1f} s")
    return f"{desc}: {done} {elapsed:.1f} s elapsed"


#: Where the plain progress lines go: ``None`` = stderr; the ``wagle`` jobs point it at their log
#: (printed and appended to ``log.txt``) while they run.
progress_sink: Optional[Callable[[str], None]] = None


def _emit(line: str) -> None:
    if progress_sink is not None:
        progress_sink(line)
    else:
        print(line, file=sys.stderr, flush=True)


def _progress_lines(iterable: Iterable, desc: str, total: Optional[int], every_s: float) -> Iterator:
    t0 = time.perf_counter()
    last = None
    done = reported = 0
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if last is None or now - last >= every_s:
            _emit(progress_line(desc, done, total, now - t0))
            last, reported = now, done
    if reported != done and (total is None or done == total):
        _emit(progress_line(desc, done, total, time.perf_counter() - t0) + " done")
