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
