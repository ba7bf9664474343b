"""End to end on a GPU (``pytest -m cuda``): back-end choice for CUDA tensors and MaskedAdamW on
CUDA parameters against the same optimizer on CPU copies. Skipped without a GPU.

The per-op GPU comparisons (cuda and compiled Triton against the CPU result) live with their op in
tests/test_<op>.py (marked ``cuda``).
"""
import pytest
import torch

import wagle_ext
from wagle_ext import ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU tests skipped"),
]

CUDA = torch.device("cuda")


def test_default_backend_for_cuda_tensors():
    info = wagle_ext.backend_info()
    want = "cuda" if info["cuda"] else ("triton" if info["triton"] else "reference")
    assert info["cuda_default"] == want


def test_masked_adamw_optimizer_on_cuda(gen):
    """MaskedAdamW on CUDA parameters matches the same optimizer on CPU copies, bit for bit."""
    from wagle_ext.optim import MaskedAdamW

    if not ops._backend_has("cuda", "masked_adamw_", CUDA) and not ops._backend_has("triton", "masked_adamw_", CUDA):
        pytest.skip("no GPU masked_adamw_ back end")
    cpu_params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((129, 65), (7,), (5000,))]
    gpu_params = [torch.nn.Parameter(p.detach().clone().to(CUDA)) for p in cpu_params]
    masks = [torch.rand(p.shape, generator=gen) < 0.2 for p in cpu_params]
    opts = [MaskedAdamW(ps, masks=[m.to(p.device) for p, m in zip(ps, masks)], lr=1e-2, weight_decay=0.1)
            for ps in (cpu_params, gpu_params)]
    for _ in range(3):
        for pc, pg in zip(cpu_params, gpu_params):
            gr = torch.randn(pc.shape, generator=gen)
            pc.grad, pg.grad = gr.clone(), gr.to(CUDA)
        for o in opts:
            o.step()
    for pc, pg in zip(cpu_params, gpu_params):
        assert torch.equal(pc.detach(), pg.detach().cpu())


# ---- issue 20: the CUDA paths the CPU tests cover, bit for bit against the CPU op -----------------------
def _require_cuda_backend(op):
    if not ops._backend_has("cuda", op, CUDA):
        pytest.skip(f"no CUDA kernel for {op}")


def _bits_equal(a, b):
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.element_size() == 2:
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    if a.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a, b)


def _on_both(fn, *args, **kwargs):
    """fn on the CPU (the C++ op) and on the GPU (WAGLE_BACKEND=cuda) with the same inputs."""
    to = lambda x, d: x.to(d) if isinstance(x, torch.Tensor) else ([to(y, d) for y in x] if isinstance(x, list) else x)  # noqa: E731
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("WAGLE_BACKEND", "cpp")
        cpu = fn(*[to(a, "cpu") for a in args], **{k: to(v, "cpu") for k, v in kwargs.items()})
        mp.setenv("WAGLE_BACKEND", "cuda")
        gpu = fn(*[to(a, CUDA) for a in args], **{k: to(v, CUDA) for k, v in kwargs.items()})
    finally:
        mp.undo()
    return cpu, gpu


def _flat(x):
    return [t for y in x for t in _flat(y)] if isinstance(x, (list, tuple)) else [x]


def test_scores_default_args_views_mixed_dtypes_inplace_empty(gen):
    """Finding 1 (return_histogram=False, the default and what score_model uses), finding 2 (mixed
    dtypes widened, not narrowed), finding 5 (out aliasing grads_forget), empty tensors, views."""
    _require_cuda_backend("attribution_score")
    w = torch.randn(1031, 9, generator=gen)
    gf, gr, h = torch.randn(1031, 9, generator=gen) * 1e-3, torch.randn(1031, 9, generator=gen) * 1e-7, torch.rand(1031, 9)
    base = torch.randn(70001, generator=gen)
    cases = [
        (([w], [gf], [gr]), {}),
        (([w], [gf], [gr]), dict(return_histogram=True)),
        (([w.bfloat16()], [gf.half()], [gr]), dict(hessian=[h.bfloat16()], return_histogram=True)),
        (([w.t()], [gf.t()], [gr.t()]), {}),
        (([base[1:]], [base[:-1]], [base[1:] * 1e-6]), dict(return_histogram=True)),  # storage offset 1: unaligned
        (([w[:0], w], [gf[:0], gf], [gr[:0], gr]), dict(return_histogram=True)),
        (([w], [gf]), dict(kind="snip")),
        (([w],), dict(kind="magnitude", return_histogram=True)),
    ]
    for args, kw in cases:
        cpu, gpu = _on_both(wagle_ext.attribution_scores, *args, **kw)
        for a, b in zip(_flat(cpu), _flat(gpu)):
            assert b.is_cuda and _bits_equal(a, b), (args[0][0].dtype, kw)
    # in place: scores overwrite g_f (out aliases grads_forget: no __restrict__ on the kernel's pointers)
    g_cpu, g_gpu = gf.clone(), gf.to(CUDA)
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("WAGLE_BACKEND", "cpp")
        wagle_ext.attribution_scores([w], [g_cpu], [gr], out=[g_cpu])
        mp.setenv("WAGLE_BACKEND", "cuda")
        wagle_ext.attribution_scores([w.to(CUDA)], [g_gpu], [gr.to(CUDA)], out=[g_gpu])
    finally:
        mp.undo()
    assert _bits_equal(g_cpu, g_gpu)


def test_masked_adamw_offsets_after_set_masks_dense_and_compact(gen):
    """MaskedAdamW on CUDA vs CPU, bit for bit, across set_masks (step offsets, finding 3), amsgrad,
    and both gradient modes; the per-step table stays small whatever the step."""
    from wagle_ext.optim import MaskedAdamW

    _require_cuda_backend("masked_adamw_")
    for grad_mode in ("dense", "compact"):
        shapes = ((129, 65), (7,), (9000,))
        cpu_params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        gpu_params = [torch.nn.Parameter(p.detach().clone().to(CUDA)) for p in cpu_params]
        masks = [torch.rand(s, generator=gen) < 0.3 for s in shapes]
        masks[1] = None
        opts = [MaskedAdamW(ps, masks=[None if m is None else m.to(p.device) for p, m in zip(ps, masks)], lr=1e-2,
                            weight_decay=0.1, amsgrad=True, grad_mode=grad_mode)
                for ps in (cpu_params, gpu_params)]
        for step in range(40):
            grads = [torch.randn(s, generator=gen) for s in shapes]
            for ps in (cpu_params, gpu_params):
                loss = sum((p * g.to(p.device)).sum() for p, g in zip(ps, grads))
                loss.backward()
            for o in opts:
                o.step()
                o.zero_grad()
            if step in (5, 30):
                new = [torch.rand(s, generator=gen) < 0.3 for s in shapes]
                for o, ps in zip(opts, (cpu_params, gpu_params)):
                    o.set_masks([m.to(p.device) for p, m in zip(ps, new)])
        for pc, pg in zip(cpu_params, gpu_params):
            assert _bits_equal(pc, pg), grad_mode
        for pc, pg in zip(cpu_params, gpu_params):
            sc, sg = opts[0].state[pc], opts[1].state[pg]
            for k in sc:
                assert _bits_equal(sc[k], sg[k]), (grad_mode, k)


def test_bad_directory_raises_before_the_state_changes(gen):
    """Finding 4: a uniformly shifted directory, or state longer than the mask's popcount, raises on
    CUDA (public op and raw op) like on the CPU, and nothing has been written."""
    _require_cuda_backend("masked_adamw_")
    n = 9000
    sel = torch.rand(n, generator=gen) < 0.4
    bits = ops.pack_bits(sel).to(CUDA)
    d = ops.masked_adamw_chunk_offsets(bits, n)
    nnz = int(d[-1])
    for bad_dir, state_n in ((d + 1, nnz + 1), (torch.cat([d[:-1], d[-1:] + 1]), nnz + 1), (d, nnz + 1)):
        p, m = torch.randn(n, device=CUDA), torch.randn(state_n, device=CUDA)
        p0, m0 = p.clone(), m.clone()
        args = ([p], [torch.randn(n, device=CUDA)], [m], [torch.zeros(state_n, device=CUDA)], [],
                [torch.tensor(1.0)], [bits], [bad_dir])
        with pytest.raises(ValueError):
            ops.masked_adamw_(*args, None, lr=1e-2)
        with pytest.raises(ValueError):
            torch.ops.wagle.masked_adamw_(*args, [torch.empty(0, dtype=torch.int32, device=CUDA)], lr=1e-2,
                                          beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False,
                                          maximize=False, weight_decay_mode="all")
        torch.cuda.synchronize()
        assert torch.equal(p, p0) and torch.equal(m, m0)


def test_step_offsets_checked_against_their_own_step(gen):
    """Finding 6: a negative offset is refused even when another tensor of the call has a larger step."""
    _require_cuda_backend("masked_adamw_")
    e = lambda dt: torch.empty(0, dtype=dt, device=CUDA)  # noqa: E731
    offs = torch.zeros(100, dtype=torch.int32, device=CUDA)
    offs[3] = -1
    ps = [torch.randn(100, device=CUDA), torch.randn(100, device=CUDA)]
    with pytest.raises(ValueError, match="step_offsets"):
        torch.ops.wagle.masked_adamw_(ps, [torch.randn(100, device=CUDA) for _ in ps],
                                      [torch.zeros(100, device=CUDA) for _ in ps], [torch.zeros(100, device=CUDA) for _ in ps],
                                      [], [torch.tensor(2.0), torch.tensor(50.0)], [e(torch.uint8)] * 2,
                                      [e(torch.int64)] * 2, [offs, torch.zeros(100, dtype=torch.int32, device=CUDA)],
                                      lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False,
                                      maximize=False, weight_decay_mode="masked")


def test_masked_adamw_steady_state_does_not_synchronise(gen):
    """Finding 8: once a mask's directory was checked, a step issues no device synchronisation."""
    from wagle_ext.optim import MaskedAdamW

    _require_cuda_backend("masked_adamw_")
    p = torch.nn.Parameter(torch.randn(20000, device=CUDA))
    opt = MaskedAdamW([p], masks=[torch.rand(20000, device=CUDA) < 0.2], lr=1e-3)
    p.grad = torch.randn(20000, device=CUDA)
    opt.step()  # first step: validates the directory (synchronises once)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_gather_masked_and_bits_views_and_empty(gen):
    _require_cuda_backend("gather_masked_")
    src = torch.randn(50, 90, generator=gen).t()  # non-contiguous
    bits = ops.pack_bits(torch.rand(90, 50, generator=gen) < 0.3)
    d = ops.masked_adamw_chunk_offsets(bits, 4500)
    cpu, gpu = _on_both(ops.gather_masked, src, bits, d)
    assert gpu.is_cuda and _bits_equal(cpu, gpu)
    with pytest.raises(ValueError):
        ops.gather_masked(src.to(CUDA), bits.to(CUDA), d.to(CUDA) + 1)
    for n in (0, 1, 4500):
        m = torch.rand(n, generator=gen) < 0.5
        cpu, gpu = _on_both(lambda x: (ops.pack_bits(x), ops.popcount_bits(ops.pack_bits(x), x.numel())), m)
        assert _bits_equal(cpu[0], gpu[0]) and cpu[1] == gpu[1]


def test_end_to_end_score_mask_unlearn_on_cuda(tmp_path, gen):
    """score_model -> build_mask -> UnlearnTrainer(MaskedAdamW) on a tiny model on the GPU, dense and
    compact gradient modes: same result in both modes, frozen weights untouched."""
    pytest.importorskip("transformers")
    import copy

    import transformers
    from torch.utils.data import DataLoader

    from tiny_models import char_tokenizer, tiny_llama
    from wagle_ext import ForgetRetainDataset, QACollator, build_mask, score_model
    from wagle_ext.fictitious_authors import make_fictitious_authors
    from wagle_ext.trainer import UnlearnTrainer

    tok = char_tokenizer()
    data = make_fictitious_authors(4, seed=0)
    model = tiny_llama(len(tok), hidden=32, layers=2, heads=4, intermediate=64, seed=0).to(CUDA)
    coll = QACollator(tok)
    scores = score_model(model, DataLoader(data["forget10"], batch_size=1, collate_fn=coll),
                         DataLoader(data["retain90"], batch_size=1, collate_fn=coll), kind="wagle", gamma=1e-6,
                         progress=False)
    assert all(s.is_cuda for s in scores.values())
    mask = build_mask(scores, 0.2, model=model)
    results = {}
    for grad_mode in ("dense", "compact"):
        m = copy.deepcopy(model)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        args = transformers.TrainingArguments(output_dir=str(tmp_path / grad_mode), per_device_train_batch_size=2,
                                              learning_rate=1e-3, max_steps=4, lr_scheduler_type="constant",
                                              save_strategy="no", report_to=[], seed=0, data_seed=0,
                                              disable_tqdm=True, max_grad_norm=0.0)
        ds = ForgetRetainDataset(data["forget10"], data["retain90"], seed=0, refusal=True)
        tr = UnlearnTrainer(model=m, args=args, objective="graddiff", mask=mask, train_dataset=ds,
                            data_collator=coll, grad_mode=grad_mode)
        tr.train()
        sel = {n: pm.to_bool() for n, pm in mask.for_model(m).items()}
        assert sel
        for n, p in m.named_parameters():
            assert p.is_cuda
            if n in sel:
                assert torch.equal(p.detach()[~sel[n].to(CUDA)], before[n][~sel[n].to(CUDA)]), n
        results[grad_mode] = {n: p.detach() for n, p in m.named_parameters()}
        assert any(not torch.equal(results[grad_mode][n], before[n]) for n in before)
    for n in results["dense"]:
        assert torch.equal(results["dense"][n], results["compact"][n]), n


# ---- compact master weights (tests/test_master_weights.py's CPU tests, on the GPU) -------------------------
@pytest.mark.parametrize("gpu_backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("grad_mode", ["dense", "compact"])
def test_master_weights_match_cpu(gpu_backend_name, dtype, rounding, grad_mode, gen, monkeypatch):
    """MaskedAdamW with master weights on CUDA bf16/fp16 parameters (CUDA kernel, compiled Triton)
    equals the C++ CPU op bit for bit: weights, master copies, across set_masks; both roundings."""
    from wagle_ext.optim import MaskedAdamW

    if not ops._backend_has(gpu_backend_name, "masked_adamw_master_", CUDA):
        pytest.skip(f"no {gpu_backend_name} masked_adamw_master_ here")
    shapes = ((129, 65), (7,), (0,), (3 * 4096 + 17,))
    cpu = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    gpu = [torch.nn.Parameter(p.detach().clone().to(CUDA)) for p in cpu]
    masks = [torch.rand(s, generator=gen) < 0.3 for s in shapes[:-1]] + [None]
    kw = dict(lr=1e-3, weight_decay=0.1, rounding=rounding, seed=5, grad_mode=grad_mode)
    o_cpu = MaskedAdamW(cpu, masks=masks, **kw)
    o_gpu = MaskedAdamW(gpu, masks=[None if m is None else m.to(CUDA) for m in masks], **kw)
    for step in range(4):
        if step == 2:
            masks = [torch.rand(s, generator=gen) < 0.5 for s in shapes[:-1]] + [None]
            o_cpu.set_masks(masks)
            o_gpu.set_masks([None if m is None else m.to(CUDA) for m in masks])
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in cpu]
        for o, ps, dev in ((o_cpu, cpu, "cpu"), (o_gpu, gpu, CUDA)):
            monkeypatch.setenv("WAGLE_BACKEND", "cpp" if dev == "cpu" else gpu_backend_name)
            for p, g in zip(ps, grads):
                p.grad = g.to(dev)
                if grad_mode == "compact":
                    o._grad_hook(p)
            o.step()
            o.zero_grad()
        for pc, pg in zip(cpu, gpu):
            assert _bits_equal(pc, pg)
            mc, mg = o_cpu.master_weight(pc), o_gpu.master_weight(pg)
            assert (mc is None and mg is None) or _bits_equal(mc, mg)


@pytest.mark.parametrize("gpu_backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_on_gpu_equals_reference(gpu_backend_name, dtype, gen):
    """The GPU's stochastic rounding draws the same bits as the spec (reference.sr_bits) for
    special values too (NaN, overflow, fp16 subnormals)."""
    from wagle_ext.kernels import reference as ref

    if not ops._backend_has(gpu_backend_name, "masked_adamw_master_", CUDA):
        pytest.skip(f"no {gpu_backend_name} masked_adamw_master_ here")
    x = torch.cat([torch.randn(50000, generator=gen), torch.randn(1000, generator=gen) * 1e-6,
                   torch.tensor([0.0, float("nan"), 70000.0, -1e-30])])
    n = x.numel()
    p = torch.zeros(n, dtype=dtype, device=CUDA)
    mw = x.to(CUDA)
    from wagle_ext.kernels import triton as tk

    fn = torch.ops.wagle.masked_adamw_master_ if gpu_backend_name == "cuda" else tk.masked_adamw_master_
    z = torch.zeros(n, device=CUDA)
    fn([p], [torch.zeros(n, dtype=dtype, device=CUDA)], [z.clone()], [z.clone()], [], [torch.tensor(3.0)],
       [torch.empty(0, dtype=torch.uint8, device=CUDA)], [torch.empty(0, dtype=torch.int64, device=CUDA)],
       [torch.empty(0, dtype=torch.int32, device=CUDA)], [mw], lr=0.0, beta1=0.9, beta2=0.999, weight_decay=0.0,
       eps=1e-8, amsgrad=False, maximize=False, weight_decay_mode="none", torch_tail=8, rounding_seeds=[41])
    want = ref.stochastic_round(x, dtype, ref.sr_bits(ref.sr_key(41, 3), torch.arange(n)))
    assert _bits_equal(p, want)
