"""Loading the user's model, tokenizer and question/answer data for the ``wagle`` jobs.

Every function here turns a user value (a command-line / config field) into a ready object, or fails
with ONE line naming the field or file: a ``ValueError`` for a bad value, a ``FileNotFoundError`` for
a path that does not exist, never an exception from deep inside ``transformers`` / ``datasets``
(those are chained as ``__cause__`` for a debug traceback).

* :func:`resolve_device`: ``auto|cpu|cuda|cuda:N`` -> ``torch.device`` (``cuda:LOCAL_RANK`` under
  ``accelerate launch`` / ``torchrun``).
* :func:`resolve_dtype`: ``auto|float32|bfloat16|float16`` -> ``torch.dtype`` for that device.
* :func:`load_model_and_tokenizer`: a ``save_pretrained`` directory, a ``.gguf`` file (dequantised into a
  trainable model) or a Hub id (local cache, ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` honoured),
  placed on the device in the dtype, pad token set, vocabulary checked.
* :func:`check_vocab`: the tokenizer cannot produce ids the model has no embedding row for.
* :func:`load_qa_data`: one data field (``data.forget``, ``data.retain``, ...) as a file path or as a
  split name inside ``data.source`` (a directory or a Hub dataset id), with a column mapping.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..eval.tofu_data import QA_FILE_SUFFIXES, load_qa_split

__all__ = ["resolve_device", "resolve_dtype", "load_model_and_tokenizer", "check_vocab", "load_qa_data",
           "launched_distributed", "DEVICE_CHOICES", "DTYPE_CHOICES"]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")

Log = Callable[[str], Any]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
_TRUE = ("1", "true", "yes", "on")


def _first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


# --------------------------------------------------------------------------------------------- devices
def launched_distributed() -> bool:
    """Whether this process was started by ``accelerate launch`` or ``torchrun`` (``LOCAL_RANK`` or
    ``ACCELERATE_MIXED_PRECISION``, which ``accelerate launch`` always sets, is in the environment)."""
    return "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ


def _cuda_unavailable(field: str, spec: str) -> ValueError:
    why = (f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None
           else "no GPU is visible")
    return ValueError(f"{field} {spec}: CUDA is not available ({why}); use {field} cpu")


def _launched_device(spec: str, field: str) -> torch.device:
    """The device of this rank under a launcher: accelerate's ``PartialState().device`` (``cuda:LOCAL_RANK``
    with CUDA, else ``cpu``), or ``cuda:LOCAL_RANK`` computed here when accelerate is not installed."""
    try:
        from accelerate import PartialState
    except ImportError:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
            else torch.device("cpu")
    else:
        dev = PartialState().device
    if spec == "cuda" and dev.type != "cuda":
        raise _cuda_unavailable(field, spec)
    return dev


def resolve_device(spec: str = "auto", *, field: str = "--device") -> torch.device:
    """The ``torch.device`` a job runs on.

    Args:
        spec: ``"auto"`` (CUDA when ``torch.cuda.is_available()``, else CPU), ``"cpu"``, ``"cuda"``
            (the current CUDA device, ``cuda:0`` unless changed) or ``"cuda:N"`` (GPU number ``N``).
            Case and surrounding blanks are ignored.
        field: the name used in error messages.
    Under ``accelerate launch`` / ``torchrun`` (:func:`launched_distributed`), ``"auto"`` and ``"cuda"``
    give this rank's device, ``accelerate.PartialState().device``: ``cuda:LOCAL_RANK`` on a GPU machine,
    ``cpu`` otherwise (``"cuda"`` then fails as below); ``"cpu"`` stays CPU (gloo data parallel), and an
    explicit ``"cuda:N"`` is an error (every rank would use the same GPU). Creating ``PartialState`` sets up
    the process group (gloo on CPU, nccl on GPUs) as ``accelerate.Accelerator`` / the HF ``Trainer`` would;
    they share that state.
    Raises:
        ValueError: one line: an unknown spec, CUDA requested but not available, ``N`` out of range.
    """
    s = str(spec).strip().lower()
    if s == "cpu":
        return torch.device("cpu")
    if s not in ("auto", "cuda") and not s.startswith("cuda:"):
        raise ValueError(f"{field} {spec!r}: expected one of auto, cpu, cuda, cuda:N")
    if launched_distributed():
        if s.startswith("cuda:"):
            raise ValueError(f"{field} {spec}: under accelerate launch / torchrun every process uses "
                             f"cuda:LOCAL_RANK; use {field} cuda or auto")
        return _launched_device(s, field)
    if s == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if not torch.cuda.is_available():
        raise _cuda_unavailable(field, s)
    if s == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    idx = s[len("cuda:"):]
    if not idx.isdigit():
        raise ValueError(f"{field} {spec!r}: expected cuda:N with N a GPU number")
    n = torch.cuda.device_count()
    if int(idx) >= n:
        raise ValueError(f"{field} {spec}: GPU {idx} does not exist ({n} visible: cuda:0..cuda:{n - 1})")
    return torch.device("cuda", int(idx))


def resolve_dtype(spec: str = "auto", device: Union[torch.device, str] = "cpu", *,
                  field: str = "--dtype") -> torch.dtype:
    """The floating dtype of the model weights (training is done in this dtype; no autocast).

    Args:
        spec: ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (also ``fp32``, ``bf16``, ``fp16``).
            ``"auto"`` is ``bfloat16`` on a CUDA device that supports it (Ampere or newer; what
            open-unlearning and most HF fine-tuning recipes train 1B-8B models in) and ``float32``
            everywhere else (CPU, older GPUs: fp16 training would need loss scaling), whatever dtype
            the checkpoint is stored in.
        device: the device from :func:`resolve_device`.
    Raises:
        ValueError: one line: an unknown spec, ``float16`` on CPU (not supported for training there), or
            ``bfloat16`` on a GPU without bf16 support.
    """
    s = str(spec).strip().lower()
    dev = torch.device(device)
    if s == "auto":
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if s not in _DTYPES:
        raise ValueError(f"{field} {spec!r}: expected one of {', '.join(DTYPE_CHOICES)}")
    dtype = _DTYPES[s]
    if dtype == torch.float16 and dev.type == "cpu":
        raise ValueError(f"{field} {spec}: float16 is not supported for training on CPU; "
                         f"use {field} float32 or bfloat16")
    if dtype == torch.bfloat16 and dev.type == "cuda" and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{field} {spec}: this GPU does not support bfloat16; use {field} float32")
    return dtype


# ----------------------------------------------------------------------------------- model / tokenizer
def _offline() -> bool:
    """``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` read now (huggingface_hub reads them once at import)."""
    if any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache() -> str:
    """The Hub cache directory as the environment says now (``HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(k):
            return os.path.expanduser(os.environ[k])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _is_repo_id(value: str) -> bool:
    """Whether ``value`` is a valid Hub repository id (``name`` or ``org/name``)."""
    if value.count("/") > 1 or value.startswith((".", "/", "~")) or "\\" in value:
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(value)
    except ImportError:  # pragma: no cover
        return True
    except Exception:  # HFValidationError
        return False
    return True


def _source_kind(value: str, field: str, markers: Sequence[str] = ("config.json",)
                 ) -> Tuple[str, str, Optional[str]]:
    """``(kind, where, gguf_file)`` with kind ``"gguf"``, ``"dir"`` or ``"hub"``; ``where`` is what
    ``from_pretrained`` gets (the directory holding a GGUF file). A directory is a ``save_pretrained``
    one when it holds one of ``markers``."""
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        if path.lower().endswith(".gguf"):
            return "gguf", os.path.dirname(os.path.abspath(path)), os.path.basename(path)
        raise ValueError(f"{field} {value}: a file, but not a .gguf; give a save_pretrained directory, "
                         f"a .gguf file or a Hub id")
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, m)) for m in markers):
            return "dir", path, None
        ggufs = sorted(f for f in os.listdir(path) if f.lower().endswith(".gguf"))
        if len(ggufs) == 1:
            return "gguf", os.path.abspath(path), ggufs[0]
        raise ValueError(f"{field} {value}: not a save_pretrained directory (no {' or '.join(markers)})"
                         + (f" and holds several .gguf files {ggufs}; name one" if ggufs else ""))
    if path.lower().endswith((".gguf", ".json", ".safetensors", ".bin")) or not _is_repo_id(value):
        raise FileNotFoundError(f"{field} {value}: no such file or directory")
    return "hub", value, None


def _check_cached(repo_id: str, field: str, filenames: Sequence[str] = ("config.json",)) -> None:
    """Offline mode: a one-line error unless one of ``filenames`` of ``repo_id`` is in the local Hub cache."""
    from huggingface_hub import try_to_load_from_cache

    cache = _hub_cache()
    if not any(isinstance(try_to_load_from_cache(repo_id, f, cache_dir=cache), str) for f in filenames):
        raise ValueError(f"{field} {repo_id}: not in the local Hugging Face cache ({cache}) and offline mode "
                         f"(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE) forbids downloading; download it first "
                         f"(hf download {repo_id}) or give a local directory")


def _hub_kwargs(kind: str) -> dict:
    if kind != "hub":
        return {}
    return {"cache_dir": _hub_cache(), "local_files_only": _offline()}


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """``dtype=`` (transformers >= 4.56) or ``torch_dtype=`` (older)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "config.json")


def _load_tokenizer(value: str, field: str):
    from transformers import AutoTokenizer

    kind, where, gguf_file = _source_kind(value, field, _TOKENIZER_FILES)
    if kind == "hub" and _offline():
        _check_cached(where, field, _TOKENIZER_FILES)
    kw = _hub_kwargs(kind)
    if gguf_file is not None:
        kw["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(where, **kw)
    except ImportError as e:
        raise ValueError(f"{field} {value}: {_first_line(e)}") from e
    except Exception as e:  # transformers raises OSError / ValueError / KeyError ... from deep inside
        raise ValueError(f"{field} {value}: cannot load the tokenizer "
                         f"({type(e).__name__}: {_first_line(e)})") from e


def _set_pad_token(tok: Any, log: Log, field: str) -> None:
    if tok.pad_token_id is not None:
        return
    if tok.eos_token is None:
        raise ValueError(f"{field}: the tokenizer has neither a pad nor an eos token; give a tokenizer "
                         f"that defines one")
    tok.pad_token = tok.eos_token
    log(f"tokenizer: no pad token; using the eos token {tok.eos_token!r} (id {tok.eos_token_id}) as pad")


def load_model_and_tokenizer(model: str, tokenizer: Optional[str] = None, *,
                             device: Union[torch.device, str] = "cpu", dtype: torch.dtype = torch.float32,
                             log: Log = print, model_field: str = "--model",
                             tokenizer_field: str = "--tokenizer") -> Tuple[Any, Any]:
    """Load a causal LM and its tokenizer, ready to train.

    Args:
        model: one of
            (a) a ``save_pretrained`` directory (holds ``config.json``);
            (b) a ``.gguf`` file (or a directory holding exactly one ``.gguf`` and no ``config.json``):
                transformers dequantises it (``from_pretrained(dir, gguf_file=name)``) into an ordinary,
                trainable model of the same architecture (a quantised file gives its quantised values
                as floats); the tokenizer is read from the same file unless ``tokenizer`` is given;
                needs the ``gguf`` package (>= 0.10);
            (c) a Hub id (``org/name``): loaded from the local Hub cache (``HF_HUB_CACHE`` /
                ``$HF_HOME/hub``, as the environment says at call time); with ``HF_HUB_OFFLINE=1`` or
                ``TRANSFORMERS_OFFLINE=1`` nothing is downloaded and a model not in the cache is a
                one-line error; otherwise transformers downloads it.
        tokenizer: the same forms; default: ``model``.
        device: where the model is placed (:func:`resolve_device`).
        dtype: the dtype the floating weights are loaded in (:func:`resolve_dtype`); buffers the model
            keeps in float32 on purpose (rotary frequencies) are left as they are.
        log: called with one line per step (what was loaded; the pad token when it had to be set).
        model_field / tokenizer_field: the names used in error messages.
    Returns:
        ``(model, tokenizer)``: the model on ``device`` in ``dtype`` (left in the mode ``from_pretrained``
        gives, eval; ``config.use_cache`` untouched), the tokenizer with a pad token (the eos token when
        it had none, logged). :func:`check_vocab` has passed.
    Raises:
        FileNotFoundError: a path-like ``model`` / ``tokenizer`` that does not exist (named).
        ValueError: one line naming the field: not a model directory, offline and not cached, a file
            transformers cannot load (its first line), ``gguf`` missing, a tokenizer without pad and eos,
            a vocabulary mismatch (:func:`check_vocab`).
    """
    from transformers import AutoModelForCausalLM

    kind, where, gguf_file = _source_kind(str(model), model_field)
    if kind == "hub" and _offline():
        _check_cached(where, model_field)
    tok_source = str(tokenizer) if tokenizer else str(model)
    tok_field = tokenizer_field if tokenizer else model_field
    kw = dict(_hub_kwargs(kind), **_dtype_kwarg(dtype))
    if gguf_file is not None:
        kw["gguf_file"] = gguf_file
    try:
        net = AutoModelForCausalLM.from_pretrained(where, **kw)
    except ImportError as e:  # gguf not installed, an architecture's optional dependency
        raise ValueError(f"{model_field} {model}: {_first_line(e)}") from e
    except Exception as e:
        raise ValueError(f"{model_field} {model}: cannot load the model ({type(e).__name__}: "
                         f"{_first_line(e)})") from e
    tok = _load_tokenizer(tok_source, tok_field)
    _set_pad_token(tok, log, tok_field)
    check_vocab(net, tok)
    if getattr(net, "generation_config", None) is not None and net.generation_config.pad_token_id is None:
        net.generation_config.pad_token_id = tok.pad_token_id
    net.to(torch.device(device))
    n = sum(p.numel() for p in net.parameters())
    what = {"dir": "save_pretrained directory", "gguf": f"GGUF {gguf_file}, dequantised",
            "hub": "Hub cache"}[kind]
    log(f"model: {model} ({what}), {type(net).__name__}, {n / 1e6:.2f}M parameters, {dtype}, on {device}; "
        f"tokenizer: {tok_source} ({len(tok)} tokens)")
    return net, tok


def check_vocab(model: Any, tokenizer: Any) -> None:
    """Fail before any work when the tokenizer can produce token ids the model has no row for.

    Checks ``len(tokenizer)`` (and the largest id of ``tokenizer.get_vocab()``) against the rows of the
    input embedding (``model.get_input_embeddings().num_embeddings``) and the output layer, and that
    the pad / eos / bos / unk ids are within them. A tokenizer smaller than the embedding is fine
    (vocabularies are often padded to a multiple of 64).
    Raises:
        ValueError: one line naming both sizes (or the special token and its id).
    """
    emb = model.get_input_embeddings()
    rows = int(emb.num_embeddings if hasattr(emb, "num_embeddings") else emb.weight.shape[0])
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        rows = min(rows, int(out.weight.shape[0]))
    n = len(tokenizer)
    try:
        n = max(n, max(tokenizer.get_vocab().values(), default=-1) + 1)
    except (AttributeError, NotImplementedError, TypeError):
        pass
    if n > rows:
        raise ValueError(f"tokenizer/model mismatch: the tokenizer has {n} tokens but the model's embedding "
                         f"has {rows} rows (ids >= {rows} would fail); use the model's own tokenizer "
                         f"(--tokenizer)")
    for name in ("pad", "eos", "bos", "unk"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(tid, int) and not 0 <= tid < rows:
            raise ValueError(f"tokenizer/model mismatch: the {name} token id {tid} is outside the model's "
                             f"embedding of {rows} rows")


# ------------------------------------------------------------------------------------------------ data
def _parse_columns(columns: Union[None, str, Mapping[str, str]], field: str) -> Optional[dict]:
    if columns is None or columns == "" or columns == {}:
        return None
    if isinstance(columns, str):
        try:
            columns = json.loads(columns)
        except json.JSONDecodeError as e:
            raise ValueError(f"{field}: not a JSON object ({e.msg}); e.g. "
                             f"'{{\"prompt\": \"question\", \"response\": \"answer\"}}'") from None
    if not isinstance(columns, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in columns.items()):
        raise ValueError(f"{field}: expected a mapping {{field in the data: question|answer|...}}, "
                         f"got {columns!r}")
    return dict(columns)


def _looks_like_path(value: str, *, repo_id_ok: bool = False) -> bool:
    """A data file suffix, a leading ``.`` / ``/`` / ``~``, or a path separator (one ``/`` is allowed
    where a Hub id ``org/name`` may stand: ``repo_id_ok``)."""
    if value.lower().endswith(QA_FILE_SUFFIXES) or value.startswith((".", "/", "~")) or "\\" in value:
        return True
    return value.count("/") > (1 if repo_id_ok else 0)


def _blank_file(path: str) -> bool:
    """An empty (or all-blank) file: "holds no items" rather than a JSON syntax error."""
    if os.path.getsize(path) > 4096:
        return False
    with open(path, "rb") as f:
        return not f.read().strip()


def load_qa_data(source: Optional[str], spec: Optional[str], *,
                 columns: Union[None, str, Mapping[str, str]] = None,
                 require: Sequence[str] = ("question", "answer"), field: str = "data",
                 columns_field: str = "data.columns", log: Log = print) -> list:
    """Resolve one data field (``data.forget``, ``data.retain``, an eval split) to question/answer items.

    Args:
        source: ``data.source``: a directory of data files (or a ``datasets.save_to_disk`` folder), a
            single JSON file of several splits, or a Hub dataset id (``locuslab/TOFU``); may be None when
            ``spec`` is a file.
        spec: the field's value: a file path (``.json``, ``.jsonl``, ``.parquet``, or a
            ``save_to_disk`` directory; used directly, ``source`` ignored; a relative path not found in
            the working directory is also looked up inside a ``source`` directory), or a name inside
            ``source``: the file stem in a directory (``forget10`` -> ``forget10.json``), the split of a
            multi-split JSON file, or the config name of a Hub dataset (split ``"train"``, as TOFU).
        columns: ``{field in the data: field here}`` renaming applied before validation, e.g.
            ``{"prompt": "question", "response": "answer"}``; a JSON string is parsed.
        require: fields every item must have (after renaming).
        field / columns_field: the names used in error messages.
        log: called with one line: how many items came from where.
    Returns:
        A list of item dicts (``question``, ``answer``, ... as :func:`~wagle_ext.eval.tofu_data.load_qa_split`).
        There is no fallback to the embedded benchmark.
    Raises:
        ValueError: one line starting with ``field``: not set, a name without ``source``, an empty set,
            a malformed file or item, a Hub dataset that cannot be loaded (offline and not cached, ...).
        FileNotFoundError: one line starting with ``field``: a path-like value that does not exist.
    """
    rename = _parse_columns(columns, columns_field)
    if spec is None or not str(spec).strip():
        raise ValueError(f"{field} is not set: give a data file (.json, .jsonl, .parquet) or a split name "
                         f"inside data.source")
    spec = str(spec).strip()
    src = None if source is None or not str(source).strip() else str(source).strip()
    path = os.path.expanduser(spec)
    kw: dict = {"rename": rename, "require": tuple(require)}
    src_dir = os.path.expanduser(src) if src is not None else None
    if src_dir is not None and os.path.isdir(src_dir) and not os.path.exists(path) and not os.path.isabs(path) \
            and os.path.exists(os.path.join(src_dir, path)):
        path = os.path.join(src_dir, path)  # a file name relative to data.source
    if os.path.exists(path):
        where, args = path, {}
    elif _looks_like_path(spec):
        raise FileNotFoundError(f"{field} {spec}: no such file or directory")
    elif src is None:
        raise ValueError(f"{field} {spec!r}: not a file, and data.source is not set to look it up in; give a "
                         f"file path or set data.source")
    else:
        where = os.path.expanduser(src)
        on_disk_dict = os.path.isfile(os.path.join(where, "dataset_dict.json"))
        args = {"split": spec} if os.path.isfile(where) or on_disk_dict else {"name": spec}
        if not os.path.exists(where) and _looks_like_path(src, repo_id_ok=True):
            raise FileNotFoundError(f"data.source {src}: no such file or directory")
    hub = not os.path.exists(where)
    if os.path.isfile(where) and not args and _blank_file(where):
        raise ValueError(f"{field}: {where} holds no items (the file is empty)")
    try:
        items = load_qa_split(where, **args, **kw)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{field}: {_first_line(e)}") from None
    except Exception as e:  # a malformed file / item; pyarrow, datasets: offline, not found, no connection
        if hub:
            raise ValueError(f"{field} {spec!r}: cannot load it from the Hub dataset {src!r} "
                             f"({type(e).__name__}: {_first_line(e)})") from e
        msg = _first_line(e)
        if isinstance(e, ValueError) and not isinstance(e, UnicodeError) and where in msg:
            raise ValueError(f"{field}: {msg}") from None
        raise ValueError(f"{field}: {where}: cannot read it ({type(e).__name__}: {msg})") from e
    shown = f"{src} ({spec})" if hub else (where if not args else f"{where} ({spec})")
    if not items:
        raise ValueError(f"{field}: {shown} holds no items")
    log(f"{field}: {len(items)} items from {shown}")
    return items
