"""The ``wagle`` command line.

    wagle demo   [CONFIG] [--key value ...]   benchmark -> {GradDiff, NPO} x {dense, random, magnitude, wagle}
                 (--track smollm2: real knowledge of SmolLM2-135M-Instruct, as a sweep)
    wagle score  [CONFIG] [--key value ...]   attribution scores (scores.safetensors)
    wagle mask   [CONFIG] [--key value ...]   scores -> top-ratio MaskSet (mask.safetensors, mask.png)
    wagle unlearn [CONFIG] [--key value ...]  model + mask + objective -> unlearned model
    wagle eval   [CONFIG] [--key value ...]   TOFU-protocol evaluation (TOFU_EVAL.json, TOFU_SUMMARY.json)
    wagle sweep  [CONFIG] [--key value ...]   objectives x masks x ratios x lrs x seeds -> fronts, table
    wagle attack [CONFIG] [--key value ...]   relearning / in-context / prompt attacks, output quality
    wagle bench  [CONFIG] [--key value ...]   microbenchmarks of a source checkout (bench/)

CONFIG is a YAML or JSON file of the job's fields (:mod:`wagle_ext.config`); ``--key value``
overrides (dotted keys for sections: ``--benchmark.n_authors 8``, ``--unlearn.steps 10``) win over
it. ``wagle <job> --help`` lists the fields and defaults. Every job prints its progress and ends by
naming its output directory. With ``model: embedded`` (the default) the embedded benchmark is built
on first use and cached (:mod:`wagle_ext.embedded_benchmark`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

from .config import BenchConfig, DemoConfig, EvalConfig, ScoreConfig, SweepConfig, UnlearnConfig, load_config
from .config import source_root as _source_root  # noqa: F401  (tests and `wagle bench` look it up here)
from .demo import run_demo
from .jobs import run_bench, run_eval, run_score, run_unlearn
from .runs import is_main_process
from .attack import AttackConfig, run_attack
from .sweep import run_sweep

__all__ = ["main", "run_demo"]

JOBS = {"demo": DemoConfig, "score": ScoreConfig, "mask": ScoreConfig, "unlearn": UnlearnConfig,
        "eval": EvalConfig, "bench": BenchConfig, "sweep": SweepConfig, "attack": AttackConfig}


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------

def _fields_help(cls: type, prefix: str = "") -> list:
    lines = []
    for f in dataclasses.fields(cls):
        default = getattr(cls(), f.name)
        if dataclasses.is_dataclass(default):  # a nested section (benchmark, unlearn, data, eval, lora)
            lines += _fields_help(type(default), prefix + f.name + ".")
        else:
            lines.append(f"  --{prefix}{f.name} {json.dumps(default)}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``wagle <job> [config.yaml|json] [--key value ...]``; returns the exit status (2 on a bad config)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="wagle", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:12]))
    parser.add_argument("job", choices=sorted(JOBS))
    parser.add_argument("config", nargs="?", help="YAML or JSON file of job fields")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        parser.print_usage(sys.stderr)
        print(f"wagle: error: unknown job {job!r} (choose from {', '.join(sorted(JOBS))})", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(f"usage: wagle {job} [CONFIG.yaml|json] [--key value ...]\n\nfields (defaults):")
        print("\n".join(_fields_help(JOBS[job])))
        return 0
    path = rest[0] if rest and not rest[0].startswith("--") else None
    overrides = rest[1:] if path else rest
    try:
        cfg = load_config(JOBS[job], path, overrides)
    except ValueError as e:
        print(f"wagle {job}: bad config: {_one_line(e)}", file=sys.stderr)
        return 2
    try:
        if job == "demo":
            out = run_demo(cfg)["config"]["out"]
            out = os.path.abspath(out)
        elif job in ("score", "mask"):
            out = run_score(cfg, with_mask=job == "mask")
        elif job == "unlearn":
            out = run_unlearn(cfg)
        elif job == "eval":
            out = run_eval(cfg)
        elif job == "sweep":
            out = run_sweep(cfg)
        elif job == "attack":
            out = run_attack(cfg)
        else:
            out = run_bench(cfg)
    except KeyboardInterrupt:
        print(f"wagle {job}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the command line's contract: one line, exit status 1
        # Problems only visible once data/models are loaded (a split name, a mask for another model, a
        # tokenizer that does not fit the model, an unwritable --out): one line naming the cause and
        # no partial output (RunDir removed it); WAGLE_DEBUG=1 re-raises for the traceback.
        if os.environ.get("WAGLE_DEBUG"):
            raise
        print(f"wagle {job}: error: {_one_line(e)}", file=sys.stderr, flush=True)
        return 1
    finally:
        _shutdown_distributed()
    if out is not None and is_main_process():
        print(f"wagle {job}: results in {out}", flush=True)
    return 0


def _shutdown_distributed() -> None:
    """Under ``accelerate launch`` / ``torchrun``: wait for every rank, then destroy the process group.
    A gloo group left alive at interpreter exit can abort a rank ("terminate called without an active
    exception") after the work is done, and the launcher then reports the whole run as failed."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _one_line(e: BaseException) -> str:
    """The exception as one line: its message with whitespace runs collapsed; the type name is added
    for errors that are not ours to phrase (anything but ValueError / FileNotFoundError)."""
    msg = " ".join(str(e).split())
    if isinstance(e, (ValueError, FileNotFoundError)) and msg:
        return msg
    return f"{type(e).__name__}: {msg} (WAGLE_DEBUG=1 shows the traceback)" if msg else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
