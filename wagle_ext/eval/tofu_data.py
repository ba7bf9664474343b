"""Load TOFU-format question/answer sets from local files or the Hugging Face Hub.

A TOFU item is a dict ``{"question": str, "answer": str, "paraphrased_answer": str (optional),
"perturbed_answer": list[str] (optional), ...}`` (field names of HF ``locuslab/TOFU``; extra fields are
kept). Sources understood by :func:`load_qa_split`:

* a ``.json`` file: a list of items, a dict of columns (``{"question": [...], "answer": [...]}``), a dict of
  splits (``{"forget10": [...], "retain90": [...]}``, pick one with ``split``), JSON lines (what
  ``datasets.Dataset.to_json`` and the TOFU Hub repository write under a ``.json`` name), or several JSON
  arrays one after the other (one per line or concatenated, as some public TOFU copies store
  ``full.json``/``retain90.json``), loaded as their concatenation;
* a ``.jsonl`` file (one item per line);
* a ``.parquet`` file (read with ``pyarrow``);
* a directory: a ``datasets.save_to_disk`` folder, or a folder of such files chosen by ``name`` (the TOFU
  Hub layout: ``forget10.json``, ``forget10_perturbed.json``, ``retain_perturbed.json``, ...), or its only
  data file;
* otherwise a Hub dataset id, loaded with ``datasets.load_dataset(source, name, split=split or "train")``
  (the TOFU configs are all loaded with ``split="train"``).

Field names: ``rename={"source field": "our field"}`` maps fields (the CLI's ``--data.columns``); without
it, the one common alias pair ``prompt``/``response`` is read as ``question``/``answer`` in items that have
no ``question``/``answer`` (any other naming needs ``rename``). :func:`find_tofu_eval_sets` lists the TOFU
evaluation sets a source holds; :func:`load_tofu_eval_sets` loads them under the names ``evaluate_tofu``
expects. Every error about a file is a ``ValueError`` (or ``FileNotFoundError``) on one line naming it.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

__all__ = ["load_qa_split", "load_tofu_eval_sets", "find_tofu_eval_sets", "validate_qa_items",
           "QA_FILE_SUFFIXES", "FIELD_ALIASES", "TOFU_HOLDOUT_SPLITS"]

QA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")

#: The one alias pair read without an explicit ``rename``: source field -> our field, applied to an item
#: only when it lacks the target field.
FIELD_ALIASES = {"prompt": "question", "response": "answer"}

#: ``locuslab/TOFU`` holdout configs, by forget split (the holdout set matching the forget set's size).
TOFU_HOLDOUT_SPLITS = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}

PathLike = Union[str, "os.PathLike[str]"]


def validate_qa_items(items: Sequence[Mapping[str, Any]], where: str,
                      require: Sequence[str] = ("question", "answer")) -> list[dict[str, Any]]:
    """Check and normalise TOFU items; returns new dicts.

    ``question``, ``answer`` and ``paraphrased_answer`` must be str when required or present;
    ``perturbed_answer`` must be a non-empty list of str (a single str is wrapped in a list; tuples and
    numpy arrays become lists). ``where`` names the source in error messages.

    Raises:
        ValueError: naming the item index, the field and ``where``.
    """
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, Mapping):
            raise ValueError(f"{where}: item {i} is a {type(it).__name__}, expected a dict with question/answer")
        it = dict(it)
        for f in require:
            if f not in it or it[f] is None:
                hint = ("; map source fields with rename={'<source field>': %r} (wagle: --data.columns)" % f
                        if f not in it else "")
                raise ValueError(f"{where}: item {i} is missing the field {f!r} (has {sorted(it)}){hint}")
        for f in ("question", "answer", "paraphrased_answer"):
            if f in it and (f in require or it[f] is not None) and not isinstance(it[f], str):
                raise ValueError(f"{where}: item {i} field {f!r} must be a str, got {type(it[f]).__name__}")
        if it.get("perturbed_answer") is not None:
            v = it["perturbed_answer"]
            if isinstance(v, str):
                v = [v]
            elif hasattr(v, "tolist") and not isinstance(v, list):
                v = v.tolist()
            v = list(v) if isinstance(v, (list, tuple)) else v
            if not isinstance(v, list) or not v or not all(isinstance(s, str) for s in v):
                raise ValueError(f"{where}: item {i} field 'perturbed_answer' must be a non-empty list of str")
            it["perturbed_answer"] = v
        out.append(it)
    return out


def _columns_to_rows(cols: Mapping[str, Sequence[Any]], where: str) -> list[dict[str, Any]]:
    lengths = {k: len(v) for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{where}: columns have different lengths {lengths}")
    n = next(iter(lengths.values()), 0)
    return [{k: cols[k][i] for k in cols} for i in range(n)]


def _pick_split(obj: Mapping[str, Any], split: Optional[str], where: str) -> Any:
    if split is None:
        if len(obj) != 1:
            raise ValueError(f"{where} holds several splits {sorted(obj)}; choose one with split=")
        return next(iter(obj.values()))
    if split not in obj:
        raise ValueError(f"{where} has no split {split!r} (splits: {sorted(obj)})")
    return obj[split]


def _rows_from_json_value(obj: Any, split: Optional[str], where: str) -> list[Any]:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, Mapping):
        if "question" in obj and isinstance(obj["question"], list):  # columnar
            return _columns_to_rows(obj, where)
        if obj and all(isinstance(v, (list, Mapping)) for v in obj.values()):  # split name -> items
            return _rows_from_json_value(_pick_split(obj, split, where), None, f"{where}[{split!r}]")
        if "question" in obj:  # a single item
            return [obj]
    raise ValueError(f"{where}: expected a list of items, a dict of columns or a dict of splits, "
                     f"got {type(obj).__name__}")


def _read_jsonl(path: str) -> list[Any]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {ln} is not valid JSON ({e.msg})") from None
    return rows


def _json_values(text: str, path: str) -> list[Any]:
    """Every top-level JSON value of ``text`` in order (JSON lines, or arrays one per line or concatenated)."""
    dec = json.JSONDecoder()
    values, i, n = [], 0, len(text)
    while True:
        while i < n and text[i] in " \t\r\n\ufeff":
            i += 1
        if i >= n:
            return values
        try:
            v, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno} is not valid JSON ({e.msg})") from None
        values.append(v)


def _read_json(path: str, split: Optional[str]) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        # Several top-level values: JSON lines under a .json name (datasets' to_json, TOFU Hub files), or
        # several arrays (one per line or concatenated), as some public TOFU copies store full.json.
        rows: list[Any] = []
        for v in _json_values(text, path):
            rows.extend(v if isinstance(v, list) else [v])
        return rows
    return _rows_from_json_value(obj, split, path)


def _read_file(path: str, split: Optional[str]) -> list[Any]:
    low = path.lower()
    if not low.endswith(QA_FILE_SUFFIXES):
        raise ValueError(f"{path}: unsupported file type; expected one of {QA_FILE_SUFFIXES}")
    try:
        if low.endswith(".jsonl"):
            return _read_jsonl(path)
        if low.endswith(".json"):
            return _read_json(path, split)
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - datasets depends on pyarrow
            raise ImportError("reading .parquet needs pyarrow (pip install pyarrow)") from e
        return pq.read_table(path).to_pylist()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (ImportError, FileNotFoundError):
        raise
    except (ValueError, OSError) as e:  # pyarrow's errors (ArrowInvalid, ...) are ValueError / OSError subclasses
        if isinstance(e, ValueError) and str(e).startswith(path + ":"):
            raise  # ours, already one line naming the file
        raise ValueError(f"{path}: cannot read ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _data_files(directory: str) -> list[str]:
    return sorted(f for f in os.listdir(directory)
                  if f.lower().endswith(QA_FILE_SUFFIXES) and os.path.isfile(os.path.join(directory, f)))


def _read_directory(directory: str, split: Optional[str], name: Optional[str]) -> tuple[list[Any], str]:
    if os.path.isfile(os.path.join(directory, "dataset_dict.json")) or \
            os.path.isfile(os.path.join(directory, "state.json")):
        import datasets

        ds = datasets.load_from_disk(directory)
        if isinstance(ds, datasets.DatasetDict):
            ds = _pick_split(ds, split, directory)
        return ds.to_list(), directory
    files = _data_files(directory)
    key = name if name is not None else split
    if key is not None:
        hits = [f for f in files if os.path.splitext(f)[0] == key]
        if not hits:
            raise ValueError(f"{directory}: no file named {key}{{{','.join(QA_FILE_SUFFIXES)}}} "
                             f"(files: {files})")
        if len(hits) > 1:
            raise ValueError(f"{directory}: several files for {key!r}: {hits}")
        path = os.path.join(directory, hits[0])
        # ``name`` picked the file; a ``split`` left over may still pick inside a dict-of-splits JSON.
        return _read_file(path, split if name is not None else None), path
    if len(files) != 1:
        raise ValueError(f"{directory} holds {len(files)} data files {files}; choose one with name=")
    path = os.path.join(directory, files[0])
    return _read_file(path, None), path


def load_qa_split(source: Union[PathLike, str], *, split: Optional[str] = None, name: Optional[str] = None,
                  require: Sequence[str] = ("question", "answer"),
                  rename: Optional[Mapping[str, str]] = None) -> list[dict[str, Any]]:
    """Load one set of TOFU-format question/answer items.

    Args:
        source: a file (``.json``/``.jsonl``/``.parquet``), a directory, or a Hub dataset id (see module doc).
        split: the split inside a multi-split source (a dict-of-splits JSON, a ``DatasetDict`` on disk, a
            Hub dataset: default ``"train"`` there); for a directory of files without ``name``, the file stem.
        name: the configuration: for a directory, the file stem (``"forget10_perturbed"``); for the Hub,
            the config name (``load_dataset(source, name)``).
        require: fields every item must have, e.g. ``("question", "answer", "paraphrased_answer",
            "perturbed_answer")`` for truth-ratio sets.
        rename: ``{field in the source: field name here}`` applied before validation, e.g.
            ``{"paraphrased_question": "question"}``. Without it (or after it) an item with ``prompt`` /
            ``response`` and no ``question`` / ``answer`` reads those as ``question`` / ``answer``.
    Returns:
        A list of item dicts (new objects; extra fields kept, ``perturbed_answer`` as a list of str).
    Raises:
        ValueError: naming the source, the item and the field that is missing or malformed.
        FileNotFoundError: a path-like source (has a file suffix or a path separator) that does not exist.
    """
    src = os.fspath(source)
    if not isinstance(src, str) or not src:
        raise TypeError(f"source must be a non-empty path or dataset id, got {source!r}")
    if os.path.isdir(src):
        rows, where = _read_directory(src, split, name)
    elif os.path.isfile(src):
        rows, where = _read_file(src, split), src
    elif src.lower().endswith(QA_FILE_SUFFIXES) or src.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such file or directory: {src}")
    else:
        import datasets  # Hub dataset id, e.g. "locuslab/TOFU" with name="forget10_perturbed"

        ds = datasets.load_dataset(src, name, split=split or "train")
        rows, where = ds.to_list(), f"{src}" + (f" ({name})" if name else "")
    return validate_qa_items(_rename_fields(rows, rename, where), where, require)


def _rename_fields(rows: list[Any], rename: Optional[Mapping[str, str]], where: str) -> list[Any]:
    """Apply ``rename`` (source field -> our field), then the ``prompt``/``response`` alias where the item
    has no ``question``/``answer``."""
    if rename is not None:
        if not isinstance(rename, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in rename.items()):
            raise ValueError(f"{where}: rename must map source field names to field names (str -> str), "
                             f"got {rename!r}")
        targets = list(rename.values())
        if len(set(targets)) != len(targets):
            raise ValueError(f"{where}: rename maps several source fields to one field: {dict(rename)}")
    out = []
    for r in rows:
        if isinstance(r, Mapping):
            if rename:
                r = {rename.get(k, k): v for k, v in r.items()}
            if any(a in r and t not in r for a, t in FIELD_ALIASES.items()):
                r = dict(r)
                for a, t in FIELD_ALIASES.items():
                    if a in r and t not in r:
                        r[t] = r.pop(a)
        out.append(r)
    return out


# ------------------------------------------------------------------------------------------------
# The TOFU evaluation sets
# ------------------------------------------------------------------------------------------------

#: Field requirements of each kind of TOFU evaluation set (as :func:`evaluate_tofu` uses them).
_FULL = ("question", "answer", "paraphrased_answer", "perturbed_answer")
_OPTIONS = ("question", "answer", "perturbed_answer")
_QA = ("question", "answer")


def _holdout_for(forget_split: str) -> Optional[str]:
    """``holdoutNN`` for ``forgetNN`` (the holdout set of the same size), else None."""
    m = re.fullmatch(r"forget(\d+)", forget_split)
    return f"holdout{m.group(1)}" if m else None


def _official_tofu_sets(forget_split: str, official_holdout: bool = False) -> dict[str, str]:
    """``{role: locuslab/TOFU config}``; with ``official_holdout`` the holdout of TOFU's forget sizes."""
    out = {"forget": f"{forget_split}_perturbed", "retain": "retain_perturbed",
           "real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed"}
    if official_holdout and forget_split in TOFU_HOLDOUT_SPLITS:
        out["holdout"] = TOFU_HOLDOUT_SPLITS[forget_split]
    return out


def find_tofu_eval_sets(source: Union[PathLike, str], forget_split: str = "forget10") -> dict[str, str]:
    """The TOFU evaluation sets ``source`` holds: ``{role: config / file stem}``.

    Roles and configs: ``"forget"`` -> ``{forget_split}_perturbed``, ``"retain"`` -> ``retain_perturbed``,
    ``"real_authors"`` -> ``real_authors_perturbed``, ``"world_facts"`` -> ``world_facts_perturbed`` and
    ``"holdout"`` -> ``holdoutNN`` (NN of ``forgetNN``; membership inference and privleak). For a local
    directory, the sets whose file (``<config>.json``/``.jsonl``/``.parquet``) exists, found without reading
    them; for a Hub dataset id (``locuslab/TOFU``), the official full set, without any network call (the
    holdout only for ``forget01``/``forget05``/``forget10``, the sizes TOFU ships). A single file holds no
    TOFU evaluation set layout: ``{}``. Pass the result to :func:`load_tofu_eval_sets` (``sets=``).

    Raises:
        FileNotFoundError: a path-like ``source`` that does not exist.
        ValueError: ``forget_split`` is not a str.
    """
    if not isinstance(forget_split, str) or not forget_split:
        raise ValueError(f"forget_split must be a non-empty str, got {forget_split!r}")
    src = os.fspath(source)
    if os.path.isdir(src):
        stems = {os.path.splitext(f)[0] for f in _data_files(src)}
        wanted = _official_tofu_sets(forget_split)
        hold = _holdout_for(forget_split)
        if hold is not None:
            wanted["holdout"] = hold
        return {k: v for k, v in wanted.items() if v in stems}
    if os.path.isfile(src):
        return {}
    if src.lower().endswith(QA_FILE_SUFFIXES) or src.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such file or directory: {src}")
    return _official_tofu_sets(forget_split, official_holdout=True)


def _requirement(key: str, forget_split: str) -> Sequence[str]:
    if key in ("forget", forget_split) or key.startswith("retain"):
        return _FULL
    if key.startswith("holdout"):
        return _QA
    return _OPTIONS


def load_tofu_eval_sets(source: Union[PathLike, str] = "locuslab/TOFU", *, forget_split: str = "forget10",
                        holdout_split: Optional[str] = None,
                        include: Sequence[str] = ("retain", "real_authors", "world_facts"),
                        sets: Optional[Mapping[str, str]] = None,
                        rename: Optional[Mapping[str, str]] = None) -> dict[str, list]:
    """The TOFU evaluation sets as ``evaluate_tofu`` expects them.

    Loads ``{forget_split}_perturbed`` as ``data[forget_split]``, ``retain_perturbed`` as ``data["retain"]``,
    ``real_authors_perturbed`` / ``world_facts_perturbed`` as ``data["real_authors"]`` /
    ``data["world_facts"]`` (those in ``include``), and optionally ``holdout_split`` (e.g. ``"holdout10"``),
    from the Hub (default ``locuslab/TOFU``) or a local directory with the same file names. ``sets``
    (``{role: config}`` as :func:`find_tofu_eval_sets` returns it) replaces ``include`` / ``holdout_split`` and
    loads exactly those: role ``"forget"`` as ``data[forget_split]``, ``"holdout"`` as ``data["holdout"]``
    (which ``evaluate_tofu`` picks up by default), the others under their role. ``rename`` is passed to
    :func:`load_qa_split`.
    """
    if sets is None:
        cfg = {(forget_split if k == "forget" else k): v for k, v in _official_tofu_sets(forget_split).items()
               if k == "forget" or k in include}
        if holdout_split is not None:
            cfg[holdout_split] = holdout_split
    else:
        if "forget" not in sets:
            raise ValueError(f"sets has no 'forget' set (roles: {sorted(sets)})")
        cfg = {(forget_split if k == "forget" else k): v for k, v in sets.items()}
    return {key: load_qa_split(source, name=config, require=_requirement(key, forget_split), rename=rename)
            for key, config in cfg.items()}
