"""Pure-PyTorch reference of every wagle op: the executable specification.

Every other back end (C++ CPU, CUDA, Triton) is tested against these functions. They favour
clarity over speed and memory (selection concatenates and sorts); use them on small inputs.

Conventions shared by all back ends
-----------------------------------
* Scores are float32. Inputs may be float32, bfloat16 or float16; math is float32.
* The *key* of a float score is the order-preserving uint32 map ``float_key``: for non-NaN
  floats ``a < b  <=>  key(a) < key(b)``; ``-0.0`` is canonicalised to ``+0.0`` first.
* The *histogram* of a list of scores is int64[2049]: entries 0..2047 count keys by their top
  11 bits (``key >> 21``), entry 2048 counts NaN scores.
* A *bit array* holds ``ceil(numel / 8)`` uint8 bytes; bit ``j`` of byte ``i`` is element
  ``8 * i + j`` of the flattened tensor (little-endian bit order). Padding bits are zero.
* Global top-k: exactly ``k`` elements of the concatenation of all score tensors (global index =
  tensor order, then flat index) are selected; ties at the threshold go to the lowest global index.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

HIST_BITS = 11
HIST_BINS = 1 << HIST_BITS  # 2048
HIST_SIZE = HIST_BINS + 1  # + NaN counter
HIST_SHIFT = 32 - HIST_BITS

SCORE_KINDS = ("wagle", "wagle_hessian", "snip", "gradient", "magnitude")


# ----------------------------------------------------------------------------- scores
def attribution_score(
    weight: torch.Tensor,
    grad_forget: Optional[torch.Tensor],
    grad_retain: Optional[torch.Tensor],
    hessian: Optional[torch.Tensor],
    kind: str,
    gamma: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score of every element of ``weight`` (fp32, same shape) and the histogram of the scores.

    kind: ``wagle`` ``|(w - g_r/gamma) * g_f|``; ``wagle_hessian`` ``|(w - g_r/(h + eps)) * g_f|``;
    ``snip`` ``|w * g_f|``; ``gradient`` ``|g_f|``; ``magnitude`` ``|w|``.
    """
    f32 = torch.float32

    def full(x: float, like: torch.Tensor) -> torch.Tensor:
        # A float32 tensor (not a Python scalar): torch may divide by a scalar through its
        # reciprocal, which differs from true division in the last bit.
        return torch.full_like(like, x, dtype=f32)

    shape = weight.shape
    if kind == "wagle":
        gr = grad_retain.reshape(shape).to(f32)
        s = ((weight.to(f32) - gr / full(gamma, gr)) * grad_forget.reshape(shape).to(f32)).abs()
    elif kind == "wagle_hessian":
        gr = grad_retain.reshape(shape).to(f32)
        h = hessian.reshape(shape).to(f32)
        s = ((weight.to(f32) - gr / (h + full(eps, h))) * grad_forget.reshape(shape).to(f32)).abs()
    elif kind == "snip":
        s = (weight.to(f32) * grad_forget.reshape(shape).to(f32)).abs()
    elif kind == "gradient":
        s = grad_forget.reshape(shape).to(f32).abs()
    elif kind == "magnitude":
        s = weight.to(f32).abs()
    else:
        raise ValueError(f"unknown score kind {kind!r}; expected one of {SCORE_KINDS}")
    s = s.contiguous()
    return s, score_histogram(s)


# ----------------------------------------------------------------------------- keys, histograms
def float_key(x: torch.Tensor) -> torch.Tensor:
    """Order-preserving uint32 key of float scores, as int64 values in [0, 2^32)."""
    b = (x.reshape(-1).to(torch.float32) + 0.0).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    neg = (b & 0x80000000) != 0
    return torch.where(neg, b ^ 0xFFFFFFFF, b | 0x80000000)


def score_histogram(scores: torch.Tensor) -> torch.Tensor:
    """int64[2049]: counts of ``key >> 21`` for non-NaN scores, then the NaN count."""
    flat = scores.reshape(-1).to(torch.float32)
    nan = torch.isnan(flat)
    keys = float_key(flat[~nan]) >> HIST_SHIFT
    hist = torch.zeros(HIST_SIZE, dtype=torch.int64, device=scores.device)
    hist[:HIST_BINS] = torch.bincount(keys, minlength=HIST_BINS)
    hist[HIST_BINS] = int(nan.sum())
    return hist


# ----------------------------------------------------------------------------- bit packing
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor (any shape) -> uint8[ceil(numel/8)], little-endian bit order."""
    flat = mask.reshape(-1).to(torch.uint8)
    n = flat.numel()
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 bit array -> bool[numel]."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:numel].to(torch.bool)


def popcount_bits(bits: torch.Tensor, numel: int) -> int:
    """Number of set bits among the first ``numel`` bits."""
    return int(unpack_bits(bits, numel).sum())


# ----------------------------------------------------------------------------- selection
def select_topk_bits(
    scores: Sequence[torch.Tensor], k: int, largest: bool, hist: Optional[torch.Tensor] = None
) -> list[torch.Tensor]:
    """Exact global top-k of the concatenated scores as one bit array per tensor.

    Ties at the threshold go to the lowest global index (tensor order, then flat index).
    ``hist`` is accepted for signature parity with the fast back ends and ignored.
    """
    del hist
    sizes = [s.numel() for s in scores]
    n = sum(sizes)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    device = scores[0].device if scores else torch.device("cpu")
    flat = torch.cat([s.reshape(-1).to(torch.float32) for s in scores]) if scores else torch.zeros(0)
    if torch.isnan(flat).any():
        raise ValueError("scores contain NaN")
    key = float_key(flat)
    if not largest:
        key = 0xFFFFFFFF - key
    # Stable descending sort: equal keys keep ascending global index.
    order = torch.sort(key, descending=True, stable=True).indices[:k]
    sel = torch.zeros(n, dtype=torch.bool, device=device)
    sel[order] = True
    return [pack_bits(part) for part in torch.split(sel, sizes)]
