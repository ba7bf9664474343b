"""Multi-process global top-k: 2 CPU processes (gloo) give the same masks as one process.

Each rank scores only its contiguous block of parameters (``partition_names``) and
``build_mask(..., process_group=True)`` all-reduces the int64 histograms; the bits are all-gathered
so every rank holds the full MaskSet. Tie-heavy cases (``gradient`` scores have exact zeros on
unused embedding rows; ``magnitude`` on rounded weights) check the rank-major tie rule."""
import os
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from wagle_ext.attribution import accumulate_gradients, compute_scores
from wagle_ext.masks import MaskSet, build_mask, partition_names

from test_attribution import qa_batches
from tiny_models import TINY_QA, char_tokenizer, tiny_llama

CASES = [  # (kind, ratio, scope)
    ("wagle", 0.3, "global"),
    ("wagle", 0.97, "global"),
    ("gradient", 0.95, "global"),  # many exact-zero ties at the threshold
    ("magnitude_rounded", 0.5, "global"),
    ("random", 0.01, "global"),
    ("snip", 0.4, "per_tensor"),
]


def _all_scores(seed: int, names=None):
    torch.manual_seed(seed)
    tok = char_tokenizer()
    model = tiny_llama(len(tok), layers=3, seed=seed)
    forget = qa_batches(tok, TINY_QA[:4])
    retain = qa_batches(tok, TINY_QA[4:])
    g_f = accumulate_gradients(model, forget, names=names, progress=False)
    g_r = accumulate_gradients(model, retain, names=names, progress=False)
    out = {}
    for kind, _, _ in CASES:
        if kind == "magnitude_rounded":
            s = compute_scores(model, kind="magnitude", names=names)
            for n in s:
                s[n] = torch.round(s[n] * 20) / 20
        elif kind == "random":
            s = compute_scores(model, kind="random", seed=seed, names=names)
        else:
            s = compute_scores(model, g_f, g_r, kind=kind, names=names)
        out[kind] = s
    return model, out


def _worker(rank: int, world: int, outdir: str) -> None:
    # File rendezvous: no TCP port to pick, so parallel runs cannot race for one.
    rendezvous = "file://" + os.path.join(outdir, "rendezvous")
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        # Scores of the whole model were computed once by the parent (per-tensor scoring of a block,
        # compute_scores(names=block), gives the same tensors: test_attribution checks that).
        full = torch.load(os.path.join(outdir, "scores.pt"))
        sizes = [(n, t.numel()) for n, t in full["wagle"].items()]
        block = partition_names(sizes, world)[rank]
        scores = {kind: OrderedDict((n, s[n]) for n in block) for kind, s in full.items()}
        for i, (kind, ratio, scope) in enumerate(CASES):
            m = build_mask(scores[kind], ratio, scope=scope, process_group=True)
            if rank == 0:
                m.save(os.path.join(outdir, f"case{i}.safetensors"))
            # gather=False: each rank keeps its own block only.
            own = build_mask(scores[kind], ratio, scope=scope, process_group=True, gather=False)
            assert own.names() == block
            for n in block:
                assert own[n] == m[n]
        # A rank with an empty block still takes part in the histogram all-reduce.
        part = scores["wagle"] if rank == 0 else {}
        m = build_mask(part, 0.25, process_group=True)
        if rank == 0:
            m.save(os.path.join(outdir, "empty_rank.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_process_masks_equal_single_process(tmp_path, gen):
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    model, scores = _all_scores(seed)
    block1 = partition_names([(n, p.numel()) for n, p in model.named_parameters()], 2)[1]
    # Scoring only a block gives the block's tensors of the whole-model scores.
    _, part = _all_scores(seed, names=block1)
    for kind in scores:
        assert list(part[kind]) == block1
        assert all(torch.equal(part[kind][n], scores[kind][n]) for n in block1)
    torch.save({k: dict(v) for k, v in scores.items()}, tmp_path / "scores.pt")
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for i, (kind, ratio, scope) in enumerate(CASES):
        single = build_mask(scores[kind], ratio, scope=scope, model=model)
        multi = MaskSet.load(tmp_path / f"case{i}.safetensors", model=model, strict=False)
        assert multi.names() == single.names()  # rank-major order == parameter order
        assert multi == single, (kind, ratio, scope)
        if scope == "global":
            assert multi.total_selected == int(sum(p.numel() for p in model.parameters()) * ratio)
    # Rank 1 held nothing: the selection is over rank 0's block alone.
    block0 = partition_names([(n, p.numel()) for n, p in model.named_parameters()], 2)[0]
    single = build_mask({n: scores["wagle"][n] for n in block0}, 0.25)
    assert MaskSet.load(tmp_path / "empty_rank.safetensors") == single


def test_process_group_without_init_raises(gen):
    s = {"a": torch.rand(10, generator=gen)}
    with pytest.raises(ValueError, match="not initialised"):
        build_mask(s, 0.5, process_group=True)
