"""Load TOFU-format question/answer sets from local files or the Hugging Face Hub.

A TOFU item is a dict ``{"question": str, "answer": str, "paraphrased_answer": str (optional),
"perturbed_answer": list[str] (optional), ...}`` (field names of HF ``locuslab/TOFU``; extra fields are
kept). Sources understood by :func:`load_qa_split`:

* a ``.json`` file: a list of items, a dict of columns (``{"question": [...], "answer": [...]}``), a dict of
  splits (``{"forget10": [...], "retain90": [...]}``, pick one with ``split``), or JSON lines (what
  ``datasets.Dataset.to_json`` and the TOFU Hub repository write under a ``.json`` name);
* a ``.jsonl`` file (one item per line);
* a ``.parquet`` file (read with ``pyarrow``);
* a directory: a ``datasets.save_to_disk`` folder, or a folder of such files chosen by ``name`` (the TOFU
  Hub layout: ``forget10.json``, ``forget10_perturbed.json``, ``retain_perturbed.json``, ...), or its only
  data file;
* otherwise a Hub dataset id, loaded with ``datasets.load_dataset(source, name, split=split or "train")``
  (the TOFU configs are all loaded with ``split="train"``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

__all__ = ["load_qa_split", "load_tofu_eval_sets", "validate_qa_items", "QA_FILE_SUFFIXES"]

QA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")

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
                raise ValueError(f"{where}: item {i} is missing the field {f!r} (has {sorted(it)})")
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


def _read_file(path: str, split: Optional[str]) -> list[Any]:
    low = path.lower()
    if low.endswith(".jsonl"):
        return _read_jsonl(path)
    if low.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":
                raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
            return _read_jsonl(path)  # JSON lines under a .json name (datasets' to_json, TOFU Hub files)
        return _rows_from_json_value(obj, split, path)
    if low.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - datasets depends on pyarrow
            raise ImportError("reading .parquet needs pyarrow (pip install pyarrow)") from e
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported file type; expected one of {QA_FILE_SUFFIXES}")


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
            ``{"paraphrased_question": "question"}``.
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
    if rename:
        rows = [{rename.get(k, k): v for k, v in r.items()} if isinstance(r, Mapping) else r for r in rows]
    return validate_qa_items(rows, where, require)


# TOFU Hub configs (``locuslab/TOFU``) behind the set names ``evaluate_tofu`` uses.
def _tofu_eval_configs(forget_split: str, holdout_split: Optional[str],
                       include: Iterable[str]) -> dict[str, str]:
    cfg = {forget_split: f"{forget_split}_perturbed", "retain": "retain_perturbed",
           "real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed"}
    cfg = {k: v for k, v in cfg.items() if k == forget_split or k in include}
    if holdout_split is not None:
        cfg[holdout_split] = holdout_split
    return cfg


def load_tofu_eval_sets(source: Union[PathLike, str] = "locuslab/TOFU", *, forget_split: str = "forget10",
                        holdout_split: Optional[str] = None,
                        include: Sequence[str] = ("retain", "real_authors", "world_facts")) -> dict[str, list]:
    """The TOFU evaluation sets as ``evaluate_tofu`` expects them.

    Loads ``{forget_split}_perturbed`` as ``data[forget_split]``, ``retain_perturbed`` as ``data["retain"]``,
    ``real_authors_perturbed`` / ``world_facts_perturbed`` as ``data["real_authors"]`` /
    ``data["world_facts"]`` (those in ``include``), and optionally ``holdout_split`` (e.g. ``"holdout10"``),
    from the Hub (default ``locuslab/TOFU``) or a local directory with the same file names.
    """
    out: dict[str, list] = {}
    full = ("question", "answer", "paraphrased_answer", "perturbed_answer")
    for key, config in _tofu_eval_configs(forget_split, holdout_split, include).items():
        if key == holdout_split:
            req: Sequence[str] = ("question", "answer")
        elif key in ("real_authors", "world_facts"):
            req = ("question", "answer", "perturbed_answer")
        else:
            req = full
        out[key] = load_qa_split(source, name=config, require=req)
    return out
