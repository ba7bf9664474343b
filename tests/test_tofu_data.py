"""TOFU-format data loading from local JSON / JSONL / Parquet files and directories (no network)."""
import json

import pytest

from wagle_ext.fictitious_authors import make_fictitious_authors
from wagle_ext.tofu_data import find_tofu_eval_sets, load_qa_split, load_tofu_eval_sets, validate_qa_items

FULL = ("question", "answer", "paraphrased_answer", "perturbed_answer")


@pytest.fixture(scope="module")
def items():
    return make_fictitious_authors(3, seed=5)["full"][:6]


def _strip(rows):
    return [{k: r[k] for k in FULL} for r in rows]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_json_list_and_columns(tmp_path, items):
    p = tmp_path / "forget.json"
    p.write_text(json.dumps(items))
    assert load_qa_split(p, require=FULL) == items
    cols = {k: [r[k] for r in items] for k in FULL}
    p2 = tmp_path / "columns.json"
    p2.write_text(json.dumps(cols))
    assert load_qa_split(str(p2)) == _strip(items)


def test_json_dict_of_splits(tmp_path, items):
    p = tmp_path / "all.json"
    p.write_text(json.dumps({"forget": items[:2], "retain": items[2:]}))
    assert load_qa_split(p, split="retain") == items[2:]
    with pytest.raises(ValueError, match="several splits.*split="):
        load_qa_split(p)
    with pytest.raises(ValueError, match="no split 'holdout'"):
        load_qa_split(p, split="holdout")


def test_json_lines_under_json_name_and_jsonl(tmp_path, items):
    # datasets.Dataset.to_json and the TOFU Hub files write JSON lines under a .json name
    p = tmp_path / "forget10.json"
    _write_jsonl(p, items)
    assert load_qa_split(p) == items
    q = tmp_path / "forget10.jsonl"
    _write_jsonl(q, items)
    q.write_text(q.read_text() + "\n")  # a trailing blank line is fine
    assert load_qa_split(q, require=FULL) == items
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(items[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl: line 2"):
        load_qa_split(bad)


def test_parquet(tmp_path, items):
    pa = pytest.importorskip("pyarrow", reason="parquet files need pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "retain.parquet"
    pq.write_table(pa.Table.from_pylist(_strip(items)), p)
    got = load_qa_split(p, require=FULL)
    assert got == _strip(items)
    assert isinstance(got[0]["perturbed_answer"], list)


def test_directory_by_name_and_single_file(tmp_path, items):
    d = tmp_path / "tofu"
    d.mkdir()
    _write_jsonl(d / "forget10_perturbed.json", items[:3])
    _write_jsonl(d / "retain_perturbed.jsonl", items[3:])
    assert load_qa_split(d, name="retain_perturbed") == items[3:]
    assert load_qa_split(d, split="forget10_perturbed") == items[:3]
    with pytest.raises(ValueError, match="2 data files.*name="):
        load_qa_split(d)
    with pytest.raises(ValueError, match="no file named holdout10"):
        load_qa_split(d, name="holdout10")
    single = tmp_path / "one"
    single.mkdir()
    _write_jsonl(single / "x.jsonl", items)
    assert load_qa_split(single) == items


def test_save_to_disk_directory(tmp_path, items):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(_strip(items)),
                               "test": datasets.Dataset.from_list(_strip(items[:2]))})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_qa_split(tmp_path / "dd", split="test") == _strip(items[:2])


def test_validation_names_field_item_and_file(tmp_path, items):
    rows = _strip(items)
    del rows[2]["paraphrased_answer"]
    p = tmp_path / "broken.json"
    p.write_text(json.dumps(rows))
    assert len(load_qa_split(p)) == len(rows)  # only question/answer required by default
    with pytest.raises(ValueError, match=r"broken\.json: item 2 is missing the field 'paraphrased_answer'"):
        load_qa_split(p, require=FULL)
    rows = _strip(items)
    rows[1]["answer"] = 3
    p.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"broken\.json: item 1 field 'answer' must be a str"):
        load_qa_split(p)
    rows = _strip(items)
    rows[0]["perturbed_answer"] = []
    p.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="item 0 field 'perturbed_answer' must be a non-empty list"):
        load_qa_split(p)
    p.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ValueError, match="item 0 is missing the field 'answer'"):
        load_qa_split(p)
    p.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="item 0 is a int"):
        load_qa_split(p)
    p.write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_qa_split(p)


def test_normalisation_and_rename(tmp_path):
    rows = [{"paraphrased_question": "Q?", "answer": "A.", "perturbed_answer": "wrong"}]
    p = tmp_path / "x.json"
    p.write_text(json.dumps(rows))
    got = load_qa_split(p, rename={"paraphrased_question": "question"})
    assert got == [{"question": "Q?", "answer": "A.", "perturbed_answer": ["wrong"]}]
    assert validate_qa_items([{"question": "q", "answer": "a", "perturbed_answer": ("x", "y")}], "t")[0][
        "perturbed_answer"] == ["x", "y"]


def test_missing_paths_and_bad_suffix(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_qa_split(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError):
        load_qa_split("./nowhere")
    p = tmp_path / "data.csv"
    p.write_text("question,answer\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_qa_split(p)


def test_hub_name_goes_through_load_dataset(monkeypatch, items):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(_strip(items))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_qa_split("locuslab/TOFU", name="forget10_perturbed", require=FULL) == _strip(items)
    assert load_qa_split("locuslab/TOFU", name="retain_perturbed", split="train[:2]")
    assert calls == [("locuslab/TOFU", "forget10_perturbed", "train"), ("locuslab/TOFU", "retain_perturbed",
                                                                        "train[:2]")]


def test_load_tofu_eval_sets_from_a_local_hub_layout(tmp_path):
    d = make_fictitious_authors(4, seed=0)
    wf = [dict(x, perturbed_answer=["Wrong."]) for x in d["world_facts"]]
    _write_jsonl(tmp_path / "forget10_perturbed.json", _strip(d["forget10"]))
    _write_jsonl(tmp_path / "retain_perturbed.json", _strip(d["retain"]))
    _write_jsonl(tmp_path / "world_facts_perturbed.json", wf)
    _write_jsonl(tmp_path / "holdout10.json", [{"question": "q?", "answer": "a."}])
    sets = load_tofu_eval_sets(tmp_path, forget_split="forget10", holdout_split="holdout10",
                               include=("retain", "world_facts"))
    assert set(sets) == {"forget10", "retain", "world_facts", "holdout10"}
    assert sets["forget10"] == _strip(d["forget10"]) and sets["world_facts"] == wf
    with pytest.raises(ValueError, match="real_authors_perturbed"):
        load_tofu_eval_sets(tmp_path)  # real_authors is included by default and missing here


# ------------------------------------------------------------------------------------------------
# multi-array JSON, field aliases, set discovery, one-line errors (issue 14)
# ------------------------------------------------------------------------------------------------

def _one_line_naming(excinfo, path):
    msg = str(excinfo.value)
    assert "\n" not in msg and str(path) in msg, msg


@pytest.mark.parametrize("sep", ["\n", "", " \n\n"])
def test_json_of_several_arrays_loads_as_their_concatenation(tmp_path, items, sep):
    # some public TOFU copies store full.json / retain90.json as several JSON arrays, one per line
    p = tmp_path / "full.json"
    p.write_text(sep.join(json.dumps(items[i:i + 2]) for i in range(0, len(items), 2)) + "\n")
    assert load_qa_split(p, require=FULL) == items
    # arrays and single items mixed (JSON lines whose lines are arrays or objects)
    p.write_text(json.dumps(items[:3]) + "\n" + json.dumps(items[3]) + "\n" + json.dumps(items[4:]))
    assert load_qa_split(p, require=FULL) == items
    p.write_text(json.dumps(items[:2]) + "\n[{\"question\" 1}]\n")
    with pytest.raises(ValueError, match=r"full\.json: line 2 is not valid JSON") as e:
        load_qa_split(p)
    _one_line_naming(e, p)


def test_prompt_response_alias_and_explicit_rename(tmp_path, items):
    rows = [{"prompt": r["question"], "response": r["answer"], "perturbed_answer": r["perturbed_answer"]}
            for r in items]
    p = tmp_path / "pr.json"
    p.write_text(json.dumps(rows))
    got = load_qa_split(p)
    assert [g["question"] for g in got] == [r["question"] for r in items]
    assert [g["answer"] for g in got] == [r["answer"] for r in items]
    assert "prompt" not in got[0] and "response" not in got[0]
    # an item that has question/answer keeps them; the alias only fills what is absent
    both = [{"question": "Q?", "answer": "A.", "prompt": "P?", "response": "R."}]
    p.write_text(json.dumps(both))
    assert load_qa_split(p) == both
    # explicit rename (the CLI's --data.columns: source field -> our field) for any other naming
    other = [{"instruction": r["question"], "output": r["answer"]} for r in items]
    p.write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"pr\.json: item 0 is missing the field 'question'.*rename=") as e:
        load_qa_split(p)  # only prompt/response is an automatic alias
    _one_line_naming(e, p)
    got = load_qa_split(p, rename={"instruction": "question", "output": "answer"})
    assert got == [{"question": r["question"], "answer": r["answer"]} for r in items]
    with pytest.raises(ValueError, match="several source fields to one field"):
        load_qa_split(p, rename={"instruction": "question", "output": "question"})


def test_unreadable_files_are_one_line_errors_naming_the_file(tmp_path):
    p = tmp_path / "latin1.json"
    p.write_bytes('[{"question": "caf\u00e9?", "answer": "x"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.json: not UTF-8") as e:
        load_qa_split(p)
    _one_line_naming(e, p)
    pytest.importorskip("pyarrow", reason="parquet files need pyarrow")
    q = tmp_path / "random.parquet"
    q.write_bytes(b"PAR1 not really a parquet file")
    with pytest.raises(ValueError, match=r"random\.parquet: cannot read") as e:
        load_qa_split(q)
    _one_line_naming(e, q)


def _write_official_layout(d, data, holdout=True, real_authors=True):
    d.mkdir(exist_ok=True)
    _write_jsonl(d / "forget10_perturbed.json", _strip(data["forget10"]))
    _write_jsonl(d / "retain_perturbed.json", _strip(data["retain"]))
    _write_jsonl(d / "world_facts_perturbed.json", data["world_facts"])
    if real_authors:
        _write_jsonl(d / "real_authors_perturbed.json", data["world_facts"][:4])
    if holdout:
        _write_jsonl(d / "holdout10.json", [{"question": "q?", "answer": "a."}])
    _write_jsonl(d / "retain90.json", _strip(data["retain"]))


def test_find_tofu_eval_sets_local_directory_and_hub(tmp_path):
    d = make_fictitious_authors(4, seed=0)
    _write_official_layout(tmp_path / "full", d)
    full = {"forget": "forget10_perturbed", "retain": "retain_perturbed",
            "real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed",
            "holdout": "holdout10"}
    assert find_tofu_eval_sets(tmp_path / "full", "forget10") == full
    # the holdout must match the forget split's size; a missing set is simply not listed
    assert "holdout" not in find_tofu_eval_sets(tmp_path / "full", "forget05")
    _write_official_layout(tmp_path / "part", d, holdout=False, real_authors=False)
    assert find_tofu_eval_sets(tmp_path / "part", "forget10") == {
        "forget": "forget10_perturbed", "retain": "retain_perturbed", "world_facts": "world_facts_perturbed"}
    assert find_tofu_eval_sets(tmp_path / "part", "forget01") == {
        "retain": "retain_perturbed", "world_facts": "world_facts_perturbed"}
    # a Hub id: the official full set, without touching the network (datasets is never imported for it)
    assert find_tofu_eval_sets("locuslab/TOFU", "forget10") == full
    assert find_tofu_eval_sets("locuslab/TOFU", "forget01")["holdout"] == "holdout01"
    assert "holdout" not in find_tofu_eval_sets("locuslab/TOFU", "forget07")  # TOFU ships 01/05/10 only
    assert find_tofu_eval_sets(tmp_path / "full" / "retain90.json") == {}
    with pytest.raises(FileNotFoundError):
        find_tofu_eval_sets(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        find_tofu_eval_sets("./missing_dir")
    # what it finds loads, under the keys evaluate_tofu expects
    sets = load_tofu_eval_sets(tmp_path / "full", forget_split="forget10",
                               sets=find_tofu_eval_sets(tmp_path / "full", "forget10"))
    assert set(sets) == {"forget10", "retain", "real_authors", "world_facts", "holdout"}
    assert sets["forget10"] == _strip(d["forget10"]) and sets["holdout"] == [{"question": "q?", "answer": "a."}]
    with pytest.raises(ValueError, match="no 'forget' set"):
        load_tofu_eval_sets(tmp_path / "full", forget_split="forget05", sets={"retain": "retain_perturbed"})
