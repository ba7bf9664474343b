"""Bounded-memory attribution (issue 16 part 2): ``score_model(..., memory_budget=)`` scores
parameter groups in separate passes, and ``build_mask`` of the grouped scores selects with an exact
streaming top-k. Scores and masks must be bit-identical to the unbounded computation."""
import pytest
import torch
from torch.utils.data import DataLoader

from wagle_ext.attribution import GroupedScores, parse_bytes, plan_groups, score_model
from wagle_ext.masks import build_mask
from wagle_ext.masks.streaming import StreamingTopK, selection_state_bytes
from wagle_ext.ops import select_topk_mask
from wagle_ext.unlearn.data import QACollator

from tiny_models import TINY_QA, char_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), seed=5)


@pytest.fixture(scope="module")
def loaders(tok):
    coll = QACollator(tok)
    return (list(DataLoader(TINY_QA[:5], batch_size=2, collate_fn=coll)),
            list(DataLoader(TINY_QA[5:], batch_size=2, collate_fn=coll)))


def _numel(model):
    return sum(p.numel() for p in model.parameters())


def _budget(model, kind, hessian=None):
    """A budget that forces about six groups."""
    bpp = {"wagle": 12 if isinstance(hessian, str) else 8}.get(kind, 4)
    biggest = max(p.numel() for p in model.parameters())
    return max(bpp * _numel(model) // 6, bpp * biggest)


# ----------------------------------------------------------------------------- planning
def test_parse_bytes():
    assert parse_bytes("16GB") == 16 * 10**9
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes(" 1.5 mib ") == int(1.5 * 2**20)
    assert parse_bytes("2e3") == 2000
    assert parse_bytes(123) == 123
    for bad in ("16 parsecs", "GB", "-1GB", "0", 0, 1.5, True, None):
        with pytest.raises((ValueError, TypeError)):
            parse_bytes(bad)


def test_plan_groups_fit_the_budget_in_parameter_order(model):
    names = [n for n, _ in model.named_parameters()]
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    budget = _budget(model, "wagle")
    groups = plan_groups(model, budget, kind="wagle")
    assert len(groups) >= 4
    assert [n for g in groups for n in g] == names  # consecutive runs, all parameters
    assert all(8 * sum(sizes[n] for n in g) <= budget for g in groups)
    # Greedy: the next group's first tensor would not have fitted into the previous group.
    for a, b in zip(groups, groups[1:]):
        assert 8 * (sum(sizes[n] for n in a) + sizes[b[0]]) > budget
    assert len(plan_groups(model, budget, kind="snip")) < len(groups)  # 4 B per weight
    assert (len(plan_groups(model, 2 * budget, kind="wagle", hessian_estimated=True))
            > len(plan_groups(model, 2 * budget, kind="wagle")))
    assert plan_groups(model, "1TB") == [names]
    biggest = max(sizes, key=sizes.get)
    with pytest.raises(ValueError, match=biggest.replace(".", r"\.")):
        plan_groups(model, 8 * sizes[biggest] - 1)
    sub = names[3:9]
    assert [n for g in plan_groups(model, budget, names=sub) for n in g] == sub


# ----------------------------------------------------------------------------- exactness
KINDS = [("wagle", None), ("wagle", "fisher"), ("wagle", "ema"), ("snip", None), ("gradient", None),
         ("magnitude", None), ("random", None)]


@pytest.mark.parametrize("kind,hessian", KINDS)
def test_grouped_scores_and_masks_are_bit_identical(model, loaders, kind, hessian):
    forget, retain = loaders
    ref = score_model(model, forget, retain, kind=kind, hessian=hessian, progress=False)
    grouped = score_model(model, forget, retain, kind=kind, hessian=hessian, progress=False,
                          memory_budget=_budget(model, kind, hessian))
    assert isinstance(grouped, GroupedScores) and len(grouped) >= 4
    assert list(grouped.shapes) == list(ref)
    merged = grouped.materialize()
    assert list(merged) == list(ref)
    for n in ref:
        assert torch.equal(merged[n], ref[n]), n  # bit for bit
    info = dict(merged.info)
    plan = info.pop("grouped")
    assert info == ref.info  # same provenance (incl. WAGLE term norms summed over the groups)
    assert plan["groups"] == len(grouped)
    for scope, ratios in (("global", (0.0005, 0.05, 0.9, 1.0)), ("per_tensor", (0.5,))):
        for ratio in ratios:
            a = build_mask(ref, ratio, scope=scope, model=model)
            b = build_mask(grouped, ratio, scope=scope, model=model)
            assert a == b and a.checksum() == b.checksum(), (scope, ratio)
            assert a.total_selected == b.total_selected
            meta = dict(b.metadata)
            assert meta.pop("grouped")["groups"] == len(grouped)
            assert meta == a.metadata


def test_wanda_grouped_per_row(model, loaders):
    forget, _ = loaders
    ref = score_model(model, forget, kind="wanda", progress=False)
    grouped = score_model(model, forget, kind="wanda", progress=False,
                          memory_budget=4 * sum(t.numel() for t in ref.values()) // 5)
    assert len(grouped) >= 4 and list(grouped.shapes) == list(ref)
    assert build_mask(ref, 0.3, scope="per_row") == build_mask(grouped, 0.3, scope="per_row")
    assert grouped.info["grouped"]["data_passes"] == 1  # one calibration pass for all groups


def test_include_exclude_and_explicit_groups(model, loaders):
    forget, retain = loaders
    ref = score_model(model, forget, retain, progress=False)
    names = list(ref)
    groups = [names[:1], names[1:4], names[4:5], names[5:12], names[12:]]
    grouped = score_model(model, forget, retain, progress=False, groups=groups)
    assert grouped.groups == groups
    kw = dict(exclude=["embed_tokens", "norm"], include=["layers", "lm_head"])
    for excluded in ("frozen", "dense", "absent"):
        a = build_mask(ref, 0.1, excluded=excluded, **kw)
        b = build_mask(grouped, 0.1, excluded=excluded, **kw)
        assert a == b and list(a) == list(b), excluded
    with pytest.raises(ValueError, match="consecutive"):
        score_model(model, forget, retain, groups=[names[1:], names[:1]])
    with pytest.raises(ValueError, match="consecutive"):
        score_model(model, forget, retain, groups=[names[:3]])
    with pytest.raises(ValueError, match="not both"):
        score_model(model, forget, retain, groups=[names], memory_budget="1GB")
    with pytest.raises(ValueError, match="process_group"):
        build_mask(grouped, 0.1, process_group=True)
    with pytest.raises(ValueError, match="selects 0"):
        build_mask(grouped, 1e-9)


def test_only_one_group_is_trainable_per_pass_and_passes_are_counted(model, loaders):
    forget, retain = loaders
    seen = []

    class Watch:
        """A loader that records, per pass, which parameters require grad."""

        def __init__(self, batches):
            self.batches = batches

        def __len__(self):
            return len(self.batches)

        def __iter__(self):
            seen.append([n for n, p in model.named_parameters() if p.requires_grad])
            return iter(self.batches)

    budget = _budget(model, "wagle")
    grouped = score_model(model, Watch(forget), Watch(retain), progress=False, memory_budget=budget)
    assert seen == []  # nothing runs before the iteration
    mask = build_mask(grouped, 0.05)
    assert len(seen) == 2 * len(grouped) == grouped.info["grouped"]["data_passes"] == grouped.stats["data_passes"]
    for i, g in enumerate(grouped.groups):
        assert seen[2 * i] == g and seen[2 * i + 1] == g  # retain pass, then forget pass, of group i only
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert all(p.grad is None for p in model.parameters())
    assert len(grouped.stats["group_seconds"]) == len(grouped)
    assert mask.total_selected == int(_numel(model) * 0.05)


def test_bad_grouped_input_is_refused():
    class Fake:
        def __init__(self, groups, shapes):
            self.groups, self.shapes = groups, shapes

        def __iter__(self):
            return iter(self.groups)

    shapes = {"a": (4,), "b": (3,)}
    ok = [{"a": torch.arange(4.0)}, {"b": torch.arange(3.0)}]
    assert build_mask(Fake(ok, shapes), 0.5).total_selected == 3
    with pytest.raises(ValueError, match="announces"):
        build_mask(Fake([{"b": torch.zeros(3)}, {"a": torch.zeros(4)}], shapes), 0.5)
    with pytest.raises(ValueError, match="yielded 1 of the 2"):
        build_mask(Fake(ok[:1], shapes), 0.5)
    with pytest.raises(ValueError, match="shape"):
        build_mask(Fake([{"a": torch.zeros(5)}, ok[1]], shapes), 0.5)
    with pytest.raises(TypeError, match="mapping"):
        build_mask(Fake([torch.zeros(4)], shapes), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        build_mask(Fake([{"a": torch.tensor([1.0, float("nan"), 0, 0])}, ok[1]], shapes), 0.9)


# ----------------------------------------------------------------------------- streaming top-k
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_topk_matches_one_shot_selection_with_heavy_ties(gen, dtype):
    # Integer scores in a tiny range (every threshold is a tie), +0.0 and -0.0, empty tensors, and
    # random group cuts: the streamed masks must equal select_topk_mask over all tensors at once.
    shapes = [(7, 5), (0,), (33,), (4, 4, 3), (1,), (64, 9), (0, 3), (130,)]
    scores = [torch.randint(0, 6, s, generator=gen).to(dtype) for s in shapes]
    scores[2][::3] = -0.0
    n = sum(s.numel() for s in scores)
    for k in (0, 1, 5, n // 7, n // 2, n - 1, n):
        want = select_topk_mask(scores, k=k)
        cuts = sorted(torch.randperm(len(shapes) - 1, generator=gen)[:3].add(1).tolist())
        sel = StreamingTopK(k)
        for lo, hi in zip([0] + cuts, cuts + [len(shapes)]):
            sel.push([(f"t{i}", scores[i]) for i in range(lo, hi)])
            assert sel.candidates == min(k, sel.seen)
        got = sel.finish()
        assert list(got) == [f"t{i}" for i in range(len(shapes))]
        for i, w in enumerate(want):
            assert torch.equal(got[f"t{i}"].bits, w.bits), (k, i)
        assert sum(m.nnz for m in got.values()) == k


def test_streaming_topk_state_and_errors(gen):
    sel = StreamingTopK(10)
    sel.push([("a", torch.rand(1000, generator=gen))])
    assert sel.candidates == 10
    assert sel.state_bytes() == 1000 // 8 + 10 * 4 == selection_state_bytes(1000, 0.01)
    with pytest.raises(ValueError, match="twice"):
        sel.push([("a", torch.rand(3, generator=gen))])
    with pytest.raises(TypeError):
        sel.push([("b", torch.arange(3))])
    sel.finish()
    with pytest.raises(RuntimeError):
        sel.push([("c", torch.rand(3, generator=gen))])
    with pytest.raises(ValueError, match="only 3"):
        s2 = StreamingTopK(5)
        s2.push([("x", torch.rand(3, generator=gen))])
        s2.finish()
    with pytest.raises(ValueError):
        StreamingTopK(-1)
