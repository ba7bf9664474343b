"""Job configurations of the ``wagle`` command line: one dataclass per job, loaded from a YAML or
JSON file plus ``--key value`` overrides (dotted keys reach nested sections, e.g.
``--benchmark.n_authors 8``), validated field by field.

Values of overrides are parsed as YAML scalars/flow collections (``0.1``, ``true``, ``null``,
``[graddiff, npo]``, ``{beta: 0.1}``), then checked against the field's type; an unknown field or an
ill-typed value raises ``ValueError`` naming the field (``benchmark.n_authors: expected int, got
'many'``) before any work starts.

Output layout follows open-unlearning's ``saves/<mode>/<task name>``: every job writes under ``out``
(default ``saves/<job>``); evaluations write ``TOFU_EVAL.json`` / ``TOFU_SUMMARY.json`` there.

Long file: one dataclass per job (seven, ``wagle sweep``'s the largest) and the field-by-field checks of
each, kept next to each other so that a field and its rule change together; the generic loader
(YAML/overrides -> typed dataclass, ~150 lines) could move to its own module if this grows further.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import typing
from typing import Any, Callable, Optional, Sequence, Union

from .._checks import ROUNDINGS, check_grad_mode, check_ratio
from ..masks.maskset import SCOPES
from ..unlearn.data import FORGET_TARGETS
from .embedded_benchmark import BenchmarkConfig
from .track_config import TRACKS, TrackSettings

__all__ = ["DemoConfig", "ScoreConfig", "UnlearnConfig", "EvalConfig", "BenchConfig", "SweepConfig", "EvalSettings",
           "LoraSettings",
           "load_config", "parse_overrides", "config_to_dict", "MASK_KINDS", "LORA_KINDS", "EVAL_METRICS"]

# Demo mask kinds: "dense" = no mask, the others are score kinds of wagle_ext.score_model.
MASK_KINDS = ("dense", "random", "magnitude", "wagle", "snip", "gradient", "wanda")
# Demo LoRA rows (rank DemoConfig.lora_rank, merged before evaluation): default init on every decoder linear,
# FILA init on every decoder linear, default init placed by WAGLE mass at the same trainable-parameter count.
LORA_KINDS = ("lora", "lora+fila", "lora+wagle")
# Metric sets of the evaluation along the trajectory (EvalSettings.metrics).
EVAL_METRICS = ("all", "fast")
# WAGLE gammas given as a name: the Hessian diagonal estimated from the retain data (score_model's hessian=)
HESSIAN_ESTIMATES = ("fisher", "ema")
# Score kinds with a forget gradient: only they depend on what it is taken on (FORGET_TARGETS: the forget
# answers, WAGLE's snip_advanced; or refusals to the forget questions, the PO/IdkPO forget loss, WAGLE's
# snip_advanced_CL).
FORGET_GRADIENT_KINDS = ("wagle", "snip", "gradient")


@dataclasses.dataclass
class DataConfig:
    """Where the question/answer data comes from.

    ``forget`` / ``retain`` (and ``holdout`` for evaluation) are each a file (``.json``, ``.jsonl``,
    ``.parquet``; used as given) or a set name inside ``source``: a directory of such files (the name is
    the file stem, e.g. ``forget10`` for ``forget10.json``), a ``datasets.save_to_disk`` folder, or a
    ``datasets`` Hub id (``locuslab/TOFU``: the name is the config, split ``train``). ``source:
    embedded`` (the default with ``model: embedded``) is the fictitious-author benchmark. With a
    ``source``, ``forget`` / ``retain`` default to ``forget10`` / ``retain90``; without one they must be
    files. ``columns`` renames fields of the files to ours (``{"prompt": "question", "response":
    "answer"}``)."""

    source: Optional[str] = None
    forget: Optional[str] = None
    retain: Optional[str] = None
    holdout: Optional[str] = None
    columns: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class UnlearnSettings:
    """Unlearning hyperparameters shared by ``wagle unlearn`` and ``wagle demo``."""

    steps: int = 40
    learning_rate: float = 1e-3
    batch_size: int = 4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    alpha: float = 1.0            # retain-loss weight (loss = gamma * forget + alpha * retain)
    npo_beta: float = 0.1
    seed: int = 0
    grad_mode: str = "dense"      # "compact": gradients compacted in backward hooks (masked runs only)
    step_in_backward: bool = False  # with grad_mode "compact": update inside backward (max_grad_norm 0)
    master_weights: Optional[bool] = None  # fp32 copies of the selected bf16/fp16 weights (null: on for bf16/fp16)
    rounding: str = "nearest"     # master weights written back by "nearest" (even) or "stochastic" rounding
    rescore_every: int = 0        # masked runs: re-score the mask on the current model every N steps (0: never)
    logging_steps: int = 0        # a progress line every N steps (0: about 10 lines per run)
    save_steps: int = 0           # wagle unlearn: checkpoint (model, optimizer, scheduler, RNG) every N steps
    save_total_limit: int = 2     # checkpoints kept (oldest deleted first)


@dataclasses.dataclass
class LoraSettings:
    """``wagle unlearn --lora.rank R``: train LoRA adapters instead of the weights (docs/lora.md). ``init:
    fila`` = LoKU's Fisher-weighted initialisation (importances computed here on the forget data paired with
    random retain items, ``fisher_batch_size`` per batch as LoKU, or read from ``importances``, a file of
    ``wagle score --kind fisher``); ``targets: wagle`` = adapters on the modules with the most WAGLE mask
    mass (``--mask`` file, else WAGLE scores at ``ratio`` / ``gamma``), ranks proportional to the mass,
    within ``budget`` trainable parameters (default: what rank ``rank`` on every target linear trains)."""

    rank: int = 0                  # 0: no adapters (dense or masked full-weight unlearning)
    alpha: Optional[float] = None  # lora_alpha; null: 2 * rank (LoKU)
    init: str = "default"          # default (lora_B = 0) or fila
    targets: str = "all"           # all (every linear of the decoder layers, or `modules`) or wagle
    modules: Optional[list] = None  # module names to adapt (e.g. [q_proj, v_proj]); null: every decoder linear
    budget: Optional[int] = None   # targets wagle: trainable LoRA parameters; null: those of `all` at `rank`
    ratio: float = 0.1             # targets wagle without --mask: the WAGLE mask ratio
    gamma: float = 1e-6            # targets wagle without --mask: WAGLE's gamma
    importances: Optional[str] = None  # init fila: a fisher.safetensors of `wagle score --kind fisher`
    fisher_batch_size: int = 4     # init fila: batch size of the importance pass (the Fisher depends on it)
    dropout: float = 0.0           # lora_dropout (LoKU: 0)


@dataclasses.dataclass
class EvalSettings:
    """Evaluation along the unlearning trajectory (``wagle unlearn --eval_every N``, ``wagle sweep``): the
    options of ``wagle eval`` plus the metric set. ``metrics: all`` = the full TOFU protocol of ``wagle
    eval`` (ROUGE by greedy generation: the expensive part; OU's ``model_utility``); ``fast`` = no
    generation: answer probabilities, truth ratios, ``forget_quality`` and ``model_utility_no_rouge`` (the
    harmonic mean of the utility components without ROUGE)."""

    metrics: str = "all"
    retain_sets: Optional[list] = None       # as `wagle eval` (null: the protocol's sets found in the data)
    retain_model: Optional[str] = None       # a retain-only model, evaluated once (forget-quality reference)
    retain_model_eval: Optional[str] = None  # or its TOFU_EVAL.json / folder; null with embedded data: the benchmark's
    batch_size: int = 32
    max_new_tokens: Optional[int] = None     # greedy answer length for ROUGE; null: 200 (96 on the embedded benchmark)


@dataclasses.dataclass
class DemoConfig:
    """``wagle demo``: the forget-quality / model-utility fronts of every objective x mask kind over
    ``learning_rates`` x ``seeds`` (a ``wagle sweep`` into ``<out>/sweep``), then every objective x
    mask kind at one ratio, step budget and learning rate with the full evaluation, the attacks and
    the G-effect."""

    out: str = "saves/demo"
    benchmark: BenchmarkConfig = dataclasses.field(default_factory=BenchmarkConfig)
    objectives: list = dataclasses.field(default_factory=lambda: ["graddiff", "npo"])
    masks: list = dataclasses.field(default_factory=lambda: ["dense", "random", "magnitude", "wagle", "lora",
                                                             "lora+fila", "lora+wagle"])
    ratio: float = 0.1             # fraction of weights selected for update (WAGLE convention)
    gamma: float = 1e-6            # WAGLE score's Hessian constant
    lora_rank: int = 8             # rank of the LoRA rows (masks lora, lora+fila, lora+wagle), alpha 2 * rank
    unlearn: UnlearnSettings = dataclasses.field(default_factory=UnlearnSettings)
    eval_batch_size: int = 32
    attacks: bool = True           # per row: relearning (25 steps on 10% of the forget set) and prompt rewrites
    attack_learning_rate: float = 1e-3  # of the relearning attack
    geffect_every: int = 10        # G-effect of every dense and wagle run, every N steps (0: off)
    front: bool = True             # first the fronts: a sweep over learning_rates x seeds (fast metrics)
    learning_rates: list = dataclasses.field(default_factory=lambda: [5e-4, 1e-3, 2e-3, 5e-3, 1e-2])  # of the front sweep
    seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])  # unlearning seeds of the front sweep
    eval_every: int = 5            # front sweep: evaluation every N steps along each run
    workers: int = 2               # front sweep: runs in parallel processes (each num_threads threads)
    num_threads: int = 1           # torch intra-op threads (tiny models: 1 avoids spinning workers)
    overwrite: bool = False        # replace a non-empty out (only once the new run has succeeded)
    cache_dir: Optional[str] = None  # default $WAGLE_CACHE or ~/.cache/wagle_ext
    rebuild: bool = False          # retrain the benchmark models even when cached
    track: str = "embedded"        # or smollm2: real knowledge of SmolLM2-135M-Instruct, as a sweep (track_smollm2)
    smollm2: TrackSettings = dataclasses.field(default_factory=TrackSettings)  # that track's settings


@dataclasses.dataclass
class ScoreConfig:
    """``wagle score`` / ``wagle mask``: attribution scores of a model on forget/retain data, and the
    top-``ratio`` MaskSet (``mask.safetensors``, ``mask.png``, ``mask_stats.json``)."""

    out: str = "saves/mask"
    model: str = "embedded"        # "embedded", a save_pretrained directory, a .gguf file or a Hub id
    tokenizer: Optional[str] = None  # default: the model's
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    scores: Optional[str] = None   # wagle mask: a scores.safetensors of `wagle score` (no gradients computed)
    kind: str = "wagle"            # a score kind, or `fisher` (wagle score: LoKU's importances, fisher.safetensors)
    gamma: float = 1e-6
    forget_target: str = "answer"  # forget gradient on the forget answers, or "refusal": on refusals (PO/IdkPO masks)
    ratio: float = 0.1
    scope: str = "global"
    missing: str = "frozen"        # parameters the scores do not cover: "frozen" or "dense" (updated in full)
    allow_empty: bool = False      # accept a ratio that selects no weight at all
    seed: int = 0
    max_batches: Optional[int] = None
    batch_size: int = 8            # items per forward/backward while accumulating (scores do not depend on it)
    fisher_batch_size: int = 4     # kind fisher: batch size of the importance pass (LoKU: 4; the Fisher depends on it)
    memory_budget: Optional[str] = None  # wagle mask: bound the gradient accumulators ("16GB"): grouped passes
    benchmark: BenchmarkConfig = dataclasses.field(default_factory=BenchmarkConfig)
    cache_dir: Optional[str] = None
    num_threads: int = 1
    device: str = "auto"           # auto (CUDA when available), cpu, cuda, cuda:N
    dtype: str = "auto"            # auto (bfloat16 on CUDA when supported, float32 on CPU), float32, bfloat16, float16
    overwrite: bool = False        # replace a non-empty out (only once the new run has succeeded)


@dataclasses.dataclass
class UnlearnConfig:
    """``wagle unlearn``: model + optional mask + objective -> unlearned model saved under ``out``."""

    out: str = "saves/unlearn"
    model: str = "embedded"
    tokenizer: Optional[str] = None
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mask: Optional[str] = None     # a MaskSet file (``wagle mask``); None = dense unlearning
    resume: bool = False           # continue the interrupted run in <out>.partial from its last checkpoint
    objective: str = "graddiff"
    objective_kwargs: dict = dataclasses.field(default_factory=dict)
    unlearn: UnlearnSettings = dataclasses.field(default_factory=UnlearnSettings)
    lora: LoraSettings = dataclasses.field(default_factory=LoraSettings)  # LoRA adapters instead of full weights
    eval_every: int = 0            # evaluate every N steps (and at steps 0 and last) into trajectory.json; 0: never
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)  # what --eval_every evaluates, and on what
    geffect_every: int = 0         # record the G-effect every N steps into g_effect.json / g_effect.png; 0: never
    benchmark: BenchmarkConfig = dataclasses.field(default_factory=BenchmarkConfig)
    cache_dir: Optional[str] = None
    num_threads: int = 1
    device: str = "auto"           # auto (CUDA when available), cpu, cuda, cuda:N
    dtype: str = "auto"            # auto (bfloat16 on CUDA when supported, float32 on CPU), float32, bfloat16, float16
    overwrite: bool = False        # replace a non-empty out (only once the new run has succeeded)


@dataclasses.dataclass
class EvalConfig:
    """``wagle eval``: TOFU-protocol evaluation (``TOFU_EVAL.json``, ``TOFU_SUMMARY.json`` under ``out``)."""

    out: str = "saves/eval"
    model: str = "embedded"
    tokenizer: Optional[str] = None
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    # utility sets; null: the TOFU protocol's (retain, real_authors, world_facts when the source has them;
    # retain_eval and world_facts of the embedded benchmark)
    retain_sets: Optional[list] = None
    retain_model: Optional[str] = None       # a retain-only model, evaluated in the same run (forget quality)
    retain_model_eval: Optional[str] = None  # or its TOFU_EVAL.json / folder; null with embedded data: the benchmark's
    batch_size: int = 32
    max_new_tokens: Optional[int] = None     # greedy answer length for ROUGE; null: 200 (TOFU / open-unlearning)
    benchmark: BenchmarkConfig = dataclasses.field(default_factory=BenchmarkConfig)
    cache_dir: Optional[str] = None
    num_threads: int = 1
    device: str = "auto"           # auto (CUDA when available), cpu, cuda, cuda:N
    dtype: str = "auto"            # auto (bfloat16 on CUDA when supported, float32 on CPU), float32, bfloat16, float16
    overwrite: bool = False        # replace a non-empty out (only once the new run has succeeded)


@dataclasses.dataclass
class SweepConfig:
    """``wagle sweep``: objectives x mask kinds (x WAGLE gammas) x ratios x learning rates x seeds, each run
    unlearning from the same model with evaluation every ``eval_every`` steps; then the forget-quality /
    model-utility fronts (``fronts.png``), the table of the best forget quality at model utility >= 95% /
    90% of the original model's (``table.txt``) and ``results.json``. Every run writes
    ``runs/<key>/result.json`` (key: a hash of its settings); a rerun into the same ``out`` skips the runs
    already done (``--overwrite`` starts afresh). Masks depend on kind, gamma, ratio, model and data
    (never on the learning rate or the unlearning seed): built once, kept under ``masks/``."""

    out: str = "saves/sweep"
    model: str = "embedded"
    tokenizer: Optional[str] = None
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    objectives: list = dataclasses.field(default_factory=lambda: ["graddiff"])
    masks: list = dataclasses.field(default_factory=lambda: ["dense", "random", "magnitude", "wagle"])
    gammas: list = dataclasses.field(default_factory=lambda: [1e-6])  # WAGLE's gamma values; also "fisher"/"ema"
    ratios: list = dataclasses.field(default_factory=lambda: [0.1])
    scopes: list = dataclasses.field(default_factory=lambda: ["global"])  # build_mask scopes: global, per_tensor, per_row
    forget_targets: list = dataclasses.field(default_factory=lambda: ["answer"])  # wagle/snip/gradient masks: answer, refusal
    rescores: list = dataclasses.field(default_factory=lambda: [0])  # masked runs: re-score every N steps (0: never)
    lora_rank: int = 8             # masks lora, lora+fila, lora+wagle: adapters of this rank (alpha 2 x rank)
    learning_rates: list = dataclasses.field(default_factory=lambda: [1e-3])
    seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])  # unlearning seeds (data order, retain pairing)
    seed_benchmark: bool = False   # embedded model: also train one benchmark per seed (benchmark.seed + seed)
    mask_seed: int = 0             # seed of the mask scores (random masks, data order of the gradients)
    eval_every: int = 10
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    unlearn: UnlearnSettings = dataclasses.field(default_factory=UnlearnSettings)  # its learning_rate/seed: the grid's
    workers: int = 1               # runs in parallel processes (each with num_threads threads)
    benchmark: BenchmarkConfig = dataclasses.field(default_factory=BenchmarkConfig)
    cache_dir: Optional[str] = None
    rebuild: bool = False          # retrain the benchmark models even when cached
    num_threads: int = 1
    device: str = "auto"           # auto (CUDA when available), cpu, cuda, cuda:N
    dtype: str = "auto"            # auto (bfloat16 on CUDA when supported, float32 on CPU), float32, bfloat16, float16
    overwrite: bool = False        # discard the runs of an earlier sweep into out


@dataclasses.dataclass
class BenchConfig:
    """``wagle bench``: run the microbenchmarks under ``bench/`` of a source checkout."""

    out: str = "bench/results"     # where the scripts write their JSON (the default is bench/results/ of the checkout)
    scripts: list = dataclasses.field(default_factory=lambda: ["bench_score.py", "bench_select.py"])
    device: str = "cpu"            # cpu, or cuda[:N] for the scripts' GPU twins


# ------------------------------------------------------------------------------------------------
# loading and validation
# ------------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` (int/float/bool/str/list/dict/Optional/dataclass);
    ints are accepted for floats. Raises ValueError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, where + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - only the types above are used in this module
        return value
    raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _from_dict(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise ValueError(f"{prefix}{k}: unknown field of {cls.__name__} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict:
    """The configuration as plain JSON-serialisable dicts (for ``config.json`` next to the results)."""
    return dataclasses.asdict(cfg)


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(args: Sequence[str]) -> dict:
    """``["--a.b", "1", "--c=x", "--flag"]`` -> ``{"a": {"b": 1}, "c": "x", "flag": True}``.
    Dashes in keys become underscores (``--train-steps`` = ``--train_steps``)."""
    out: dict = {}
    i = 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) == 2:
            raise ValueError(f"expected --key value overrides, got {a!r}")
        key = a[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            value = _parse_value(text)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = _parse_value(args[i + 1])
            i += 2
        else:
            value = True
            i += 1
        parts = key.replace("-", "_").split(".")
        d = out
        for p in parts[:-1]:
            nxt = d.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"{key}: {p!r} is given both as a value and as a section")
            d = nxt
        d[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_config_file(path: Union[str, os.PathLike]) -> dict:
    """A YAML (``.yaml``/``.yml``) or JSON file holding one mapping (an empty file is ``{}``)."""
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"config file not found: {path}")
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot parse: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type, path: Optional[Union[str, os.PathLike]] = None,
                overrides: Union[Sequence[str], dict, None] = None) -> Any:
    """Build a ``cls`` (one of the job dataclasses) from defaults, then the file at ``path`` (YAML or
    JSON), then ``overrides`` (``--key value`` strings or a nested dict). Raises ValueError naming the
    first unknown or ill-typed field; semantic checks of values follow in :func:`validate`."""
    values: dict = read_config_file(path) if path else {}
    if overrides:
        extra = parse_overrides(overrides) if not isinstance(overrides, dict) else overrides
        values = _merge(values, extra)
    cfg = _from_dict(cls, values)
    validate(cfg)
    return cfg


def source_root() -> Optional[str]:
    """The source checkout this package runs from (the folder holding ``bench/``), or None for an
    installed package."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return here if os.path.isfile(os.path.join(here, "bench", "_common.py")) else None


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{field}: {msg}")


def _check_by(check: Callable[..., Any], field: str, msg: str, *args: Any) -> None:
    """Run a shared check of :mod:`wagle_ext._checks` (one source per rule) and report a failure
    the config way: ``field: msg``."""
    try:
        check(*args)
    except (TypeError, ValueError):
        raise ValueError(f"{field}: {msg}") from None


def _validate_benchmark(b: BenchmarkConfig, p: str = "benchmark.") -> None:
    _check(b.n_authors >= 2, p + "n_authors", f"must be >= 2, got {b.n_authors}")
    _check(b.forget_split in ("forget01", "forget05", "forget10"), p + "forget_split",
           f"must be forget01, forget05 or forget10, got {b.forget_split!r}")
    for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "train_steps", "batch_size",
              "max_length"):
        _check(getattr(b, k) >= 1, p + k, f"must be >= 1, got {getattr(b, k)}")
    _check(b.hidden_size % b.num_heads == 0, p + "hidden_size",
           f"must be a multiple of num_heads ({b.num_heads}), got {b.hidden_size}")
    _check(b.tokenizer in ("bpe", "char"), p + "tokenizer", f"must be 'bpe' or 'char', got {b.tokenizer!r}")
    _check(b.vocab_size >= 300, p + "vocab_size", f"must be >= 300 (256 bytes + specials), got {b.vocab_size}")
    _check(b.learning_rate > 0, p + "learning_rate", f"must be > 0, got {b.learning_rate}")


def _validate_unlearn(u: UnlearnSettings, p: str = "unlearn.") -> None:
    for k in ("steps", "batch_size"):
        _check(getattr(u, k) >= 1, p + k, f"must be >= 1, got {getattr(u, k)}")
    _check(u.learning_rate > 0, p + "learning_rate", f"must be > 0, got {u.learning_rate}")
    _check(u.weight_decay >= 0, p + "weight_decay", f"must be >= 0, got {u.weight_decay}")
    _check(u.max_grad_norm >= 0, p + "max_grad_norm", f"must be >= 0, got {u.max_grad_norm}")
    _check(u.rounding in ROUNDINGS, p + "rounding", f"must be one of {list(ROUNDINGS)}, got {u.rounding!r}")
    _check(u.rounding != "stochastic" or u.master_weights is not False, p + "rounding",
           "stochastic rounding writes back master weights: it needs master_weights true (or null)")
    _check_by(check_grad_mode, p + "grad_mode", f"must be dense or compact, got {u.grad_mode!r}", u.grad_mode)
    _check_by(check_grad_mode, p + "step_in_backward", "needs grad_mode compact and max_grad_norm 0", u.grad_mode,
              u.step_in_backward)
    _check(not u.step_in_backward or u.max_grad_norm == 0, p + "step_in_backward",
           "needs grad_mode compact and max_grad_norm 0")
    for k in ("logging_steps", "save_steps", "rescore_every"):
        _check(getattr(u, k) >= 0, p + k, f"must be >= 0, got {getattr(u, k)}")
    _check(not u.rescore_every or u.grad_mode == "dense", p + "rescore_every", "needs grad_mode dense")
    _check(u.save_total_limit >= 1, p + "save_total_limit", f"must be >= 1, got {u.save_total_limit}")


def _validate_lora(lo: LoraSettings, cfg: Any, p: str = "lora.") -> None:
    from ..lora import LORA_INITS

    _check(lo.rank >= 0, p + "rank", f"must be >= 0 (0: no adapters), got {lo.rank}")
    _check(lo.init in LORA_INITS, p + "init", f"must be one of {', '.join(LORA_INITS)}, got {lo.init!r}")
    _check(lo.targets in ("all", "wagle"), p + "targets", f"must be all or wagle, got {lo.targets!r}")
    if lo.rank == 0:
        changed = [k for k in ("alpha", "init", "targets", "modules", "budget", "importances")
                   if getattr(lo, k) != getattr(LoraSettings, k)]
        _check(not changed, p + changed[0] if changed else p + "rank",
               "needs LoRA adapters: set --lora.rank (e.g. 8)")
        return
    _check(lo.alpha is None or lo.alpha > 0, p + "alpha", f"must be > 0, got {lo.alpha}")
    _check(lo.budget is None or lo.budget >= 1, p + "budget", f"must be >= 1, got {lo.budget}")
    _check(lo.budget is None or lo.targets == "wagle", p + "budget", "only applies to --lora.targets wagle")
    _check_by(check_ratio, p + "ratio", f"must be in (0, 1], got {lo.ratio}", lo.ratio)
    _check(lo.gamma > 0, p + "gamma", f"must be > 0, got {lo.gamma}")
    _check(lo.fisher_batch_size >= 1, p + "fisher_batch_size", f"must be >= 1, got {lo.fisher_batch_size}")
    _check(0 <= lo.dropout < 1, p + "dropout", f"must be in [0, 1), got {lo.dropout}")
    _check(lo.modules is None or (len(lo.modules) > 0 and all(isinstance(m, str) for m in lo.modules)),
           p + "modules", f"must be a non-empty list of module names, got {lo.modules!r}")
    if lo.importances is not None:
        _check(lo.init == "fila", p + "importances", "only used by --lora.init fila")
        _check(os.path.isfile(lo.importances), p + "importances", f"file not found: {lo.importances}")
    _check(cfg.mask is None or lo.targets == "wagle", "mask",
           "LoRA trains adapters, not masked weights: with --lora.rank a mask can only place the adapters "
           "(--lora.targets wagle)")
    _check(not cfg.resume, "resume", "is not supported with LoRA adapters (--lora.rank)")


def _validate_eval(e: EvalSettings, p: str = "eval.") -> None:
    _check(e.metrics in EVAL_METRICS, p + "metrics", f"must be one of {', '.join(EVAL_METRICS)}, got {e.metrics!r}")
    _check(e.batch_size >= 1, p + "batch_size", f"must be >= 1, got {e.batch_size}")
    _check(e.max_new_tokens is None or e.max_new_tokens >= 1, p + "max_new_tokens",
           f"must be >= 1, got {e.max_new_tokens}")
    _check(e.retain_model is None or e.retain_model_eval is None, p + "retain_model",
           "give retain_model (evaluated once) or retain_model_eval (its saved evaluation), not both")
    if e.retain_model is not None and e.retain_model != "embedded" and _looks_like_path(e.retain_model):
        _check(os.path.exists(e.retain_model), p + "retain_model", f"not found: {e.retain_model}")
    if e.retain_model_eval not in (None, "embedded"):
        _check(os.path.exists(e.retain_model_eval), p + "retain_model_eval", f"not found: {e.retain_model_eval}")


def _as_float(v: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: numbers in lists are converted here."""
    if isinstance(v, str) and v not in HESSIAN_ESTIMATES:
        try:
            return float(v)
        except ValueError:
            return v
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


def demo_sweep_config(cfg: DemoConfig) -> "SweepConfig":
    """The front sweep of ``wagle demo``: its objectives, masks (LoRA rows included, rank
    ``lora_rank``), gamma and ratio over its ``learning_rates`` x ``seeds`` on the same embedded
    benchmark, evaluated every ``eval_every`` steps with the fast metrics, into ``<out>/sweep``."""
    return SweepConfig(
        out=os.path.join(cfg.out, "sweep"), model="embedded", data=DataConfig(source="embedded"),
        objectives=list(cfg.objectives), masks=list(cfg.masks), lora_rank=cfg.lora_rank,
        gammas=[cfg.gamma], ratios=[cfg.ratio], learning_rates=list(cfg.learning_rates),
        seeds=list(cfg.seeds), eval_every=cfg.eval_every, eval=EvalSettings(metrics="fast"),
        unlearn=copy.deepcopy(cfg.unlearn), workers=cfg.workers, benchmark=copy.deepcopy(cfg.benchmark),
        cache_dir=cfg.cache_dir, num_threads=cfg.num_threads, device="cpu", overwrite=True)


def _check_forget_target(target: Any, field: str, kinds: Sequence[str]) -> None:
    _check(target in FORGET_TARGETS, field, f"must be one of {', '.join(FORGET_TARGETS)}, got {target!r}")
    _check(target == "answer" or any(k in FORGET_GRADIENT_KINDS for k in kinds), field,
           f"'refusal' changes the forget gradient; no kind of {list(kinds)} takes one "
           f"(kinds with one: {', '.join(FORGET_GRADIENT_KINDS)})")


def _validate_sweep(cfg: "SweepConfig") -> None:
    from ..attribution import SCORE_KINDS

    cfg.gammas, cfg.ratios, cfg.learning_rates = ([_as_float(v) for v in getattr(cfg, k)]
                                                  for k in ("gammas", "ratios", "learning_rates"))
    _check(len(cfg.objectives) > 0, "objectives", "must name at least one objective")
    for i, o in enumerate(cfg.objectives):
        _validate_objective(o, f"objectives[{i}]")
    _check(len(cfg.masks) > 0, "masks", "must name at least one mask kind")
    for i, m in enumerate(cfg.masks):
        _check(m == "dense" or m in SCORE_KINDS or m in LORA_KINDS, f"masks[{i}]",
               f"unknown mask kind {m!r} (known: dense, {', '.join(SCORE_KINDS + LORA_KINDS)})")
    _check(isinstance(cfg.lora_rank, int) and cfg.lora_rank >= 1, "lora_rank",
           f"must be an int >= 1, got {cfg.lora_rank!r}")
    _check(len(set(cfg.masks)) == len(cfg.masks), "masks", "names a mask kind twice")
    _check(len(cfg.gammas) > 0 or not {"wagle", "lora+wagle"} & set(cfg.masks), "gammas",
           "must hold at least one gamma for wagle")
    for i, g in enumerate(cfg.gammas):
        ok = g in HESSIAN_ESTIMATES or (isinstance(g, (int, float)) and not isinstance(g, bool) and g > 0)
        _check(ok, f"gammas[{i}]", f"must be a number > 0 or one of {', '.join(HESSIAN_ESTIMATES)}, got {g!r}")
    for i, t in enumerate(cfg.forget_targets):
        _check_forget_target(t, f"forget_targets[{i}]", cfg.masks)
    for i, sc in enumerate(cfg.scopes):
        _check(sc in SCOPES, f"scopes[{i}]",
               f"must be global, per_tensor or per_row, got {sc!r}")
    for i, r in enumerate(cfg.rescores):
        _check(isinstance(r, int) and not isinstance(r, bool) and r >= 0, f"rescores[{i}]",
               f"must be an int >= 0, got {r!r}")
    _check(cfg.unlearn.grad_mode == "dense" or cfg.rescores == [0], "rescores", "need unlearn.grad_mode dense")
    _check(cfg.unlearn.rescore_every == 0, "unlearn.rescore_every", "is a grid axis in a sweep: use --rescores")
    for name in ("ratios", "scopes", "forget_targets", "rescores", "learning_rates", "seeds"):
        values = getattr(cfg, name)
        _check(len(values) > 0, name, "must hold at least one value")
        _check(len(set(map(str, values))) == len(values), name, "holds a value twice")
    for i, r in enumerate(cfg.ratios):
        _check_by(check_ratio, f"ratios[{i}]", f"must be in (0, 1], got {r!r}", r)
    for i, lr in enumerate(cfg.learning_rates):
        _check(isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0, f"learning_rates[{i}]",
               f"must be a number > 0, got {lr!r}")
    for i, s in enumerate(cfg.seeds):
        _check(isinstance(s, int) and not isinstance(s, bool) and s >= 0, f"seeds[{i}]",
               f"must be an int >= 0, got {s!r}")
    _check(cfg.eval_every >= 1, "eval_every", f"must be >= 1, got {cfg.eval_every}")
    _check(cfg.workers >= 1, "workers", f"must be >= 1, got {cfg.workers}")
    _check(not cfg.seed_benchmark or cfg.model == "embedded", "seed_benchmark",
           "only applies to the embedded benchmark (--model embedded)")


DEVICE_CHOICES = ("auto", "cpu", "cuda")
# `datasets.load_dataset` builder names: as a source they would read every file of the current folder
_DATASETS_BUILDERS = ("json", "jsonl", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "imagefolder")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def _validate_device(cfg: Any) -> None:
    if hasattr(cfg, "device"):
        d = cfg.device
        ok = d in DEVICE_CHOICES or (d.startswith("cuda:") and d[5:].isdigit())
        _check(ok, "device", f"must be auto, cpu, cuda or cuda:N, got {d!r}")
    if hasattr(cfg, "dtype"):
        _check(cfg.dtype in DTYPE_CHOICES, "dtype", f"must be one of {', '.join(DTYPE_CHOICES)}, got {cfg.dtype!r}")


def _required_data(cfg: Any) -> tuple:
    """The data fields a job cannot run without (a job class may say with ``DATA_FIELDS``)."""
    if isinstance(cfg, EvalConfig):
        return ("forget",)
    return getattr(type(cfg), "DATA_FIELDS", ("forget", "retain"))


def _validate_data(cfg: Any) -> None:
    """Where the data comes from must be said: a model of one's own never falls back to the embedded
    benchmark's data (that would score the model on someone else's questions)."""
    d = cfg.data
    if d.source is None and cfg.model == "embedded" and d.forget is None and d.retain is None:
        d.source = "embedded"  # the benchmark's model on the benchmark's data; files given are used as given
    if d.source == "embedded":
        _check(not d.columns, "data.columns", "does not apply to the embedded benchmark")
        return
    _check(d.source is None or os.path.exists(d.source) or d.source.lower() not in _DATASETS_BUILDERS,
           "data.source", f"{d.source!r} names a `datasets` file format, not a dataset: give the files themselves "
           "(--data.forget forget.json --data.retain retain.json) or the folder holding them")
    for k, v in d.columns.items():
        _check(isinstance(k, str) and isinstance(v, str), "data.columns",
               f"must map field names to field names, got {k!r}: {v!r}")
    if d.source is None:
        for field in _required_data(cfg):
            v = getattr(d, field)
            _check(v is not None, "data." + field,
                   f"required with --model {cfg.model}: a .json/.jsonl/.parquet file, or a set name with "
                   "--data.source DIR|HUB_ID (no default data for a model of your own)")
            _check(os.path.isfile(v), "data." + field,
                   f"file not found: {v} (without --data.source, data.{field} must be a file)")
    else:
        if d.forget is None:
            d.forget = "forget10"
        if d.retain is None and "retain" in _required_data(cfg):
            d.retain = "retain90"


def _validate_objective(name: str, field: str) -> None:
    from ..unlearn.objectives import OBJECTIVES

    _check(isinstance(name, str) and name.lower() in OBJECTIVES, field,
           f"unknown objective {name!r} (known: {', '.join(sorted(OBJECTIVES))})")


def validate(cfg: Any) -> None:
    """Semantic checks (ranges, known names) of a job config; ValueError naming the field."""
    from ..attribution import SCORE_KINDS

    if hasattr(cfg, "num_threads"):
        _check(cfg.num_threads >= 1, "num_threads", f"must be >= 1, got {cfg.num_threads}")
    if hasattr(cfg, "benchmark"):
        _validate_benchmark(cfg.benchmark)
    if hasattr(cfg, "unlearn"):
        _validate_unlearn(cfg.unlearn)
    if isinstance(getattr(cfg, "eval", None), EvalSettings):
        _validate_eval(cfg.eval)
    if isinstance(cfg, DemoConfig):
        _check_by(check_ratio, "ratio", f"must be in (0, 1], got {cfg.ratio}", cfg.ratio)
        _check(cfg.gamma > 0, "gamma", f"must be > 0, got {cfg.gamma}")
        _check(len(cfg.objectives) > 0, "objectives", "must name at least one objective")
        for i, o in enumerate(cfg.objectives):
            _validate_objective(o, f"objectives[{i}]")
        _check(len(cfg.masks) > 0, "masks", "must name at least one mask kind")
        for i, m in enumerate(cfg.masks):
            _check(m in MASK_KINDS + LORA_KINDS, f"masks[{i}]",
                   f"unknown mask kind {m!r} (known: {', '.join(MASK_KINDS + LORA_KINDS)})")
        _check(cfg.lora_rank >= 1, "lora_rank", f"must be >= 1, got {cfg.lora_rank}")
        _check(cfg.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {cfg.eval_batch_size}")
        _check(cfg.attack_learning_rate > 0, "attack_learning_rate", f"must be > 0, got {cfg.attack_learning_rate}")
        _check(cfg.geffect_every >= 0, "geffect_every", f"must be >= 0, got {cfg.geffect_every}")
        _check(cfg.track in TRACKS, "track", f"unknown track {cfg.track!r} (known: {', '.join(TRACKS)})")
        from .track_config import check_track

        check_track(cfg)  # the smollm2 section's fields; with track smollm2 the optional packages too
        sweep = demo_sweep_config(cfg)
        if cfg.track == "embedded" and cfg.front and sweep.masks:  # the front's fields carry the demo's names
            _validate_sweep(sweep)
            cfg.learning_rates = sweep.learning_rates
    elif isinstance(cfg, ScoreConfig):
        _check(cfg.missing in ("frozen", "dense"), "missing", f"must be frozen or dense, got {cfg.missing!r}")
        _check(cfg.batch_size >= 1, "batch_size", f"must be >= 1, got {cfg.batch_size}")
        _check(cfg.fisher_batch_size >= 1, "fisher_batch_size", f"must be >= 1, got {cfg.fisher_batch_size}")
        if cfg.scores is not None:
            cfg.scores = _run_file(cfg.scores, "scores.safetensors")
            _check(os.path.isfile(cfg.scores), "scores", f"file not found: {cfg.scores}")
        if cfg.memory_budget is not None:
            from ..attribution import parse_bytes

            _check_by(parse_bytes, "memory_budget", f"a size such as 16GB or 512MiB, got {cfg.memory_budget!r}",
                      cfg.memory_budget)
        _check(cfg.kind in SCORE_KINDS or cfg.kind == "fisher", "kind",
               f"unknown score kind {cfg.kind!r} (known: {', '.join(SCORE_KINDS)}, fisher)")
        _check_forget_target(cfg.forget_target, "forget_target", [cfg.kind])
        _check(cfg.forget_target == "answer" or cfg.scores is None, "forget_target",
               "is a setting of the gradients; --scores reads scores made earlier (their file records it)")
        _check_by(check_ratio, "ratio", f"must be in (0, 1], got {cfg.ratio}", cfg.ratio)
        _check(cfg.gamma > 0, "gamma", f"must be > 0, got {cfg.gamma}")
        _check(cfg.scope in SCOPES, "scope",
               f"must be global, per_tensor or per_row, got {cfg.scope!r}")
    elif isinstance(cfg, SweepConfig):
        _validate_sweep(cfg)
    elif isinstance(cfg, UnlearnConfig):
        _check(cfg.geffect_every >= 0, "geffect_every", f"must be >= 0, got {cfg.geffect_every}")
        _validate_objective(cfg.objective, "objective")
        _check(cfg.eval_every >= 0, "eval_every", f"must be >= 0, got {cfg.eval_every}")
        if cfg.mask is not None:
            cfg.mask = _run_file(cfg.mask, "mask.safetensors")
            _check(os.path.isfile(cfg.mask), "mask", f"file not found: {cfg.mask} (a mask file, or the folder of "
                   "a `wagle mask` run)")
        _validate_lora(cfg.lora, cfg)
    elif isinstance(cfg, EvalConfig):
        _check(cfg.batch_size >= 1, "batch_size", f"must be >= 1, got {cfg.batch_size}")
        _check(cfg.max_new_tokens is None or cfg.max_new_tokens >= 1, "max_new_tokens",
               f"must be >= 1, got {cfg.max_new_tokens}")
        _check(cfg.retain_model is None or cfg.retain_model_eval is None, "retain_model",
               "give retain_model (evaluated now) or retain_model_eval (its saved evaluation), not both")
    elif isinstance(cfg, BenchConfig):
        root = source_root()
        for i, s in enumerate(cfg.scripts):
            _check(root is None or os.path.isfile(os.path.join(root, "bench", s)), f"scripts[{i}]",
                   f"{s!r} not found in {os.path.join(str(root), 'bench')}")
    _validate_device(cfg)
    for name in ("model", "tokenizer", "retain_model"):
        v = getattr(cfg, name, None)
        if v is not None and v != "embedded" and _looks_like_path(v):
            _check(os.path.exists(v), name, f"not found: {v} (a save_pretrained directory, a .gguf file or a Hub id)")
    if hasattr(cfg, "data") and not (isinstance(cfg, ScoreConfig) and cfg.scores is not None):
        _validate_data(cfg)


def _run_file(path: str, name: str) -> str:
    """``path`` itself, or ``path/name`` when ``path`` is the output folder of an earlier job (``wagle
    unlearn --mask runs/mask`` reads ``runs/mask/mask.safetensors``)."""
    inner = os.path.join(path, name)
    return inner if os.path.isdir(path) and os.path.isfile(inner) else path


def _looks_like_path(v: str) -> bool:
    """A value meant as a local path (not a Hub id ``org/name``)."""
    return v.startswith((".", "/", "~")) or v.endswith(".gguf") or os.sep + os.sep in v or v.count("/") > 1 \
        or os.path.exists(v)
