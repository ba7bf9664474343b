"""Shared benchmark plumbing: timing, a copy-bandwidth probe, peak-RSS sampling, model-like tensor
shapes, table printing and JSON output. Every bench measures its PyTorch baselines and the copy
probe in the same run, so ratios and bandwidth fractions are like-for-like.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import threading
import time
from typing import Callable, Iterable, Optional

import torch

# `wagle bench --out DIR` (or WAGLE_BENCH_OUT=DIR) redirects every JSON result; default bench/results/.
RESULTS_DIR = os.path.abspath(os.environ.get("WAGLE_BENCH_OUT") or
                              os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))


def timeit(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> dict:
    """Median/min wall time (seconds) of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": reps}


def copy_bandwidth(nbytes: int = 400 * 2**20, reps: int = 7) -> float:
    """Copy bandwidth in bytes/s counting read + write (``dst.copy_(src)`` on float32 buffers)."""
    n = nbytes // 4
    src = torch.rand(n)
    dst = torch.empty(n)
    dst.copy_(src)  # fault the pages in
    t = timeit(lambda: dst.copy_(src), reps=reps, warmup=2)
    return 2 * n * 4 / t["median_s"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process RSS every ``interval`` s; ``.extra`` = peak minus RSS at entry (bytes)."""

    def __init__(self, interval: float = 0.0005):
        self.interval = interval
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        gc.collect()
        self.base = self.peak = rss_bytes()
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def model_like_shapes(total: float = 1e8, n_layers: int = 24, seed: int = 0) -> list[tuple[int, ...]]:
    """~9 tensors per decoder layer (q,k,v,o, gate,up,down, 2 norms) plus embeddings, final norm and
    lm_head, scaled so the element count is close to ``total`` -- a Llama-like model's worth of
    mixed shapes (2-D matrices of odd sizes and 1-D norm vectors)."""
    del seed
    # Llama proportions: intermediate = 8/3 hidden, vocab = 16 * hidden.
    # params ~= n_layers * (4 h^2 + 3 * 8/3 h^2) + 2 * 16 h * h = h^2 * (12 n_layers + 32)
    h = int((total / (12 * n_layers + 32)) ** 0.5)
    h -= h % 2
    h += 1  # odd sizes: exercise tails of vector loops
    inter = (8 * h) // 3
    vocab = 16 * h
    shapes = [(vocab, h)]
    for _ in range(n_layers):
        shapes += [(h, h), (h, h), (h, h), (h, h), (inter, h), (inter, h), (h, inter), (h,), (h,)]
    shapes += [(h,), (vocab, h)]
    return shapes


def numel(shapes: Iterable[tuple[int, ...]]) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    headers = [h for _, h, _ in columns]
    body = [[("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print("  ".join(c.rjust(w) for c, w in zip(b, widths)))


def write_json(name: str, payload: dict, path: Optional[str] = None) -> str:
    path = path or os.path.join(RESULTS_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = {"bench": name, "environment": environment(), **payload}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"\nwrote {path}")
    return path


def run_gpu_twin_if_asked(argv, gpu_module: str) -> None:
    """``--device cuda[:i]``: run this bench's GPU twin (``bench/<gpu_module>.py``, same rows on the
    device, ratios against the torch baselines measured there) and exit with its status."""
    import argparse
    import importlib
    import sys

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device", default="cpu")
    known, _ = p.parse_known_args(argv)
    if known.device.startswith("cuda"):
        sys.exit(importlib.import_module(gpu_module).main(["--device", known.device]))


def cuda_time(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Median seconds of fn() on the current stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def cuda_copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """Device copy bandwidth in bytes/s counting read + write."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * 4 / t
