"""Safe output directories, run records and logs for the ``wagle`` jobs.

A job writes into ``<out>.partial/`` (a sibling of ``out``) and renames it to ``out`` only when it
succeeds, so ``out`` never holds a mix of two runs or the remains of a failed one:

* ``out`` must not exist or be empty, unless ``--overwrite`` (then it is replaced when the new run
  succeeds, not before);
* a run that fails removes ``<out>.partial/`` -- unless it holds training checkpoints
  (``--unlearn.save_steps``), which are kept for ``--resume``; a run killed outright (``kill -9``,
  power loss) leaves ``<out>.partial/`` behind, and the next run into the same ``out`` refuses to
  start until it is told ``--resume`` (continue from its last checkpoint) or ``--overwrite`` (discard
  it);
* every run writes ``config.json`` (its fields), ``run.json`` (argv, config, versions, device, git commit of a source checkout,
  phase timings, status) and ``log.txt`` (every progress line the job printed, time-stamped).

Under ``accelerate launch`` / ``torchrun`` only the main process (rank 0) creates, writes and renames
the directory; the other ranks use the same path (the file system is assumed shared, as it is on one
machine) and do not write.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

__all__ = ["RunDir", "is_main_process", "world_size", "rank", "barrier", "versions", "git_commit",
           "PARTIAL_SUFFIX"]

PARTIAL_SUFFIX = ".partial"


def rank() -> int:
    """This process's rank: torch.distributed's when initialised, else ``RANK`` from the launcher."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except Exception:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    except Exception:  # pragma: no cover
        pass
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op in a single process or before the process group exists)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    except Exception:  # pragma: no cover
        pass


def _broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself in a single process)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]
    except ImportError:  # pragma: no cover
        pass
    return value


def git_commit(path: Optional[str]) -> Optional[str]:
    """The commit of the git checkout holding ``path`` (``+dirty`` when it has local changes), or None."""
    if not path or not os.path.isdir(os.path.join(path, ".git")) and not os.path.isfile(os.path.join(path, ".git")):
        return None
    try:
        sha = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) or None


def versions() -> dict:
    """Versions of Python and of the packages a run depends on (None when not installed)."""
    from .._version import __version__

    out: dict = {"python": platform.python_version(), "wagle_ext": __version__}
    for name in ("torch", "transformers", "accelerate", "datasets", "safetensors", "peft"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", None)
        except Exception:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except Exception:  # pragma: no cover
        pass
    return out


def _is_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.listdir(path)


class RunDir:
    """The output directory of one job (see the module docstring).

    ``path`` is where the results end up; while the job runs everything is written under
    :attr:`work` (``path + ".partial"``). Use as a context manager: on a clean exit the work directory
    is renamed to ``path`` (replacing an old one only with ``overwrite``); on an exception it is
    removed unless :meth:`keep_on_failure` was called (checkpoints for ``--resume``).

    Raises:
        ValueError (at construction): ``path`` exists and is not empty without ``overwrite``; a
        ``.partial`` directory of an interrupted run exists and neither ``resume`` nor ``overwrite``
        was given; ``resume`` without one; the parent directory is not writable.
    """

    def __init__(self, path: str, *, overwrite: bool = False, resume: bool = False, job: str = "job",
                 argv: Optional[Sequence[str]] = None, config: Optional[dict] = None, echo: bool = True,
                 source_root: Optional[str] = None):
        self.path = os.path.abspath(os.fspath(path))
        self.work = self.path + PARTIAL_SUFFIX
        self.job, self.echo = job, echo
        self.main = is_main_process()
        self._keep = False
        self._t0 = time.perf_counter()
        self._phases: dict = {}
        self._log_file = None
        # Rank 0 checks and creates the work directory; the others learn the outcome from it (checking
        # themselves would race with rank 0 creating <out>.partial).
        error = None
        if self.main:
            try:
                self._prepare(overwrite, resume)
            except ValueError as e:
                error = str(e)
        error = _broadcast_from_main(error)
        if error is not None:
            raise ValueError(error)
        barrier()
        self.record: dict = {
            "job": job, "status": "running", "argv": list(argv) if argv is not None else sys.argv[1:],
            "config": config, "versions": versions(), "git_commit": git_commit(source_root),
            "host": socket.gethostname(), "platform": platform.platform(), "world_size": world_size(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "resumed": bool(resume), "timings_s": self._phases,
        }
        self.write_record()
        if self.main and config is not None:  # the config alone, to rerun with `wagle <job> config.json`
            with open(os.path.join(self.work, "config.json"), "w") as f:
                json.dump(config, f, indent=2)

    def _prepare(self, overwrite: bool, resume: bool) -> None:
        """Rank 0: the checks of the class docstring, then create the work directory and open the log."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ValueError(f"out: {self.path} exists and is not a directory")
        if os.path.isdir(self.path) and not _is_empty_dir(self.path) and not overwrite:
            raise ValueError(f"out: {self.path} exists and is not empty; choose a new --out or pass --overwrite "
                             "(the old results are replaced only if the new run succeeds)")
        if resume and not os.path.isdir(self.work):
            raise ValueError(f"resume: no interrupted run to resume ({self.work} does not exist)")
        if os.path.isdir(self.work) and not resume and not overwrite:
            raise ValueError(f"out: {self.work} holds an interrupted run; pass --resume to continue it from its last "
                             "checkpoint or --overwrite to discard it")
        parent = os.path.dirname(self.path)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise ValueError(f"out: cannot create {parent}: {e.strerror}") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"out: cannot write to {parent} (permission denied)")
        if os.path.isdir(self.work) and not resume:
            shutil.rmtree(self.work)
        os.makedirs(self.work, exist_ok=True)
        self._log_file = open(os.path.join(self.work, "log.txt"), "a", encoding="utf-8")

    # ------------------------------------------------------------------ logging
    def log(self, msg: str) -> None:
        """Print ``msg`` (main process only) and append it, time-stamped, to ``log.txt``."""
        if not self.main:
            return
        if self.echo:
            print(msg, flush=True)
        if self._log_file is not None:
            stamp = datetime.datetime.now().strftime("%H:%M:%S")
            for line in str(msg).splitlines() or [""]:
                self._log_file.write(f"{stamp} {line}\n")
            self._log_file.flush()

    def file(self, *parts: str) -> str:
        """A path under the work directory (parents created)."""
        p = os.path.join(self.work, *parts)
        if self.main:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def dir(self, *parts: str) -> str:
        """A folder under the work directory (created on the main process)."""
        p = os.path.join(self.work, *parts)
        if self.main:
            os.makedirs(p, exist_ok=True)
        return p

    def phase(self, name: str) -> "_Phase":
        """``with run.phase("score"): ...`` records the phase's wall time in ``run.json``."""
        return _Phase(self, name)

    def update(self, **fields: Any) -> None:
        self.record.update(fields)
        self.write_record()

    def write_record(self) -> None:
        if not self.main:
            return
        self.record["seconds"] = time.perf_counter() - self._t0
        tmp = os.path.join(self.work, "run.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.record, f, indent=2, default=str)
        os.replace(tmp, os.path.join(self.work, "run.json"))

    def keep_on_failure(self) -> None:
        """Keep the work directory if the job fails from now on (it holds checkpoints)."""
        self._keep = True

    # ------------------------------------------------------------------ finish
    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        ok = exc_type is None
        if ok:
            self.record["status"] = "finished"
        else:
            self.record["status"] = "failed"
            self.record["error"] = f"{exc_type.__name__}: {exc}"
        self.record["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        if ok or self._keep:
            self.write_record()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        barrier()
        if self.main:
            if ok:
                if os.path.isdir(self.path):
                    old = self.path + ".old"
                    if os.path.exists(old):
                        shutil.rmtree(old)
                    os.rename(self.path, old)
                    os.rename(self.work, self.path)
                    shutil.rmtree(old)
                else:
                    os.rename(self.work, self.path)
            elif not self._keep:
                shutil.rmtree(self.work, ignore_errors=True)
        barrier()
        return False


class _Phase:
    def __init__(self, run: RunDir, name: str):
        self.run, self.name = run, name

    def __enter__(self) -> "_Phase":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.run._phases[self.name] = self.run._phases.get(self.name, 0.0) + time.perf_counter() - self.t0
        self.run.write_record()
        return False


LogFn = Callable[[str], None]
