"""The fictitious-author QA generator: deterministic, TOFU-shaped, disjoint splits."""
import pytest

from wagle_ext.fictitious_authors import FORGET_SPLITS, make_fictitious_authors


def test_deterministic_and_seed_dependent():
    a = make_fictitious_authors(30, seed=3)
    assert a == make_fictitious_authors(30, seed=3)
    assert a["full"] != make_fictitious_authors(30, seed=4)["full"]


@pytest.mark.parametrize("n", [2, 17, 100])
def test_splits_partition_the_authors(n):
    d = make_fictitious_authors(n, seed=0)
    names = [a["name"] for a in d["authors"]]
    assert len(set(names)) == n
    for split, frac in FORGET_SPLITS.items():
        forget = d[split]
        retain = d["retain" + str(100 - int(round(frac * 100))).zfill(2)]
        fa = {x["author"] for x in forget}
        ra = {x["author"] for x in retain}
        assert fa and not (fa & ra) and fa | ra == set(range(n))
        assert len(fa) == max(1, round(frac * n))
        assert len(forget) + len(retain) == len(d["full"])
    assert d["retain"] == d["retain90"]


def test_items_have_tofu_fields_and_wrong_perturbations():
    d = make_fictitious_authors(10, seed=1, n_perturbed=4)
    for x in d["full"]:
        assert set(x) >= {"question", "answer", "paraphrased_answer", "perturbed_answer"}
        assert len(x["perturbed_answer"]) == 4
        assert x["answer"] not in x["perturbed_answer"]
        assert len(set(x["perturbed_answer"])) == 4
        assert x["paraphrased_answer"] != x["answer"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_authors"):
        make_fictitious_authors(1)
    with pytest.raises(ValueError, match="n_perturbed"):
        make_fictitious_authors(5, n_perturbed=0)


def test_world_facts_are_tofu_shaped():
    d = make_fictitious_authors(3)
    for x in d["world_facts"]:
        assert len(x["perturbed_answer"]) == 3 and x["answer"] not in x["perturbed_answer"]
        assert x["paraphrased_answer"] != x["answer"]
