"""Hypothesis strategies for tests/test_fuzz_ops.py: ragged lists of float tensors (empty, size-1,
odd, chunk-boundary sizes), every float dtype, non-contiguous views, tie-heavy values and the IEEE
specials (+-inf, NaN, subnormals, +-0).

Hypothesis draws small *descriptions* (frozen dataclasses with a readable repr: shapes, layouts,
dtypes, value recipes, mask recipes) plus one integer seed; the tensors are built from them with a
seeded ``torch.Generator``. Drawing thousands of elements one by one through Hypothesis would be
slow and its shrinking useless; this way a falsifying example prints as a short recipe that
rebuilds the exact tensors (``build_tensor(spec, torch.Generator().manual_seed(seed))``), and
shrinking still minimises the sizes, the layouts and the value mix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from hypothesis import strategies as st

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Sizes at and around the SIMD widths, 64-bit mask words, bytes of bits and the 4096-element
# chunks of masked_adamw / gather_masked; plus any size up to the bound.
EDGE_SIZES = (0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257,
              511, 513, 1023, 1024, 1025, 4095, 4096, 4097, 8191, 8193)

# Layouts of a tensor in memory (the logical values are the same in every layout):
#   contiguous  -- a plain tensor
#   offset      -- contiguous, but starting 1..3 elements into its storage (misaligned)
#   strided     -- every 2nd/3rd element of a larger buffer along the last dim (non-contiguous)
#   transposed  -- the transpose of a contiguous 2-D tensor (non-contiguous when both dims > 1)
LAYOUTS = ("contiguous", "offset", "strided", "transposed")

# Values from which "ties" tensors are drawn: exactly representable in every float dtype (so a tie
# stays a tie after the cast), signed zeros included.
TIE_POOL = (0.0, -0.0, 0.25, 0.5, 1.0, -1.0, 1.5, 3.0, -3.0, 1024.0, 2.0 ** -14)


@dataclass(frozen=True)
class Values:
    """How to fill a tensor.

    mode: ``"normal"`` (randn * 10**scale_exp), ``"ties"`` (uniform draws from ``pool``),
    ``"tiny"`` (randn * the dtype's smallest normal: mostly subnormals of the dtype), ``"huge"``
    (randn * the dtype's max / 4: overflows to inf in arithmetic).
    special_frac: fraction of elements replaced by IEEE specials (+-0, +-1, +-subnormal,
    +-max, +-inf, NaN; the non-finite ones only where the property allows them).
    """

    mode: str
    scale_exp: int = 0
    pool: tuple = ()
    special_frac: float = 0.0


@dataclass(frozen=True)
class TSpec:
    """One tensor: logical shape, memory layout, dtype and value recipe."""

    shape: tuple
    layout: str
    dtype: torch.dtype
    values: Values

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class MaskSpec:
    """A selection mask: ``"dense"`` (no mask: every element), ``"empty"``, ``"full"``,
    ``"random"`` (Bernoulli ``density``) or ``"clustered"`` (runs of random length, like rows)."""

    kind: str
    density: float = 0.5


# ----------------------------------------------------------------------------- strategies
def sizes(max_numel: int) -> st.SearchStrategy[int]:
    edges = [s for s in EDGE_SIZES if s <= max_numel]
    return st.one_of(st.sampled_from(edges), st.integers(0, max_numel))


@st.composite
def shapes(draw, max_numel: int) -> tuple:
    """0-d, 1-d or 2-d shapes with at most ``max_numel`` elements (0 and 1 included)."""
    ndim = draw(st.sampled_from((1, 1, 2, 2, 0)))
    if ndim == 0:
        return ()
    if ndim == 1:
        return (draw(sizes(max_numel)),)
    rows = draw(st.sampled_from((0, 1, 2, 3, 5, 8, 17, 33)).filter(lambda r: r <= max(max_numel, 1)))
    cols = draw(st.integers(0, max_numel // max(rows, 1)))
    return (rows, cols)


def values(allow_huge: bool = True) -> st.SearchStrategy[Values]:
    modes = ["normal", "normal", "ties", "ties", "tiny"] + (["huge"] if allow_huge else [])
    return st.builds(
        Values,
        mode=st.sampled_from(modes),
        scale_exp=st.integers(-8, 4),
        pool=st.lists(st.sampled_from(TIE_POOL), min_size=1, max_size=4).map(tuple),
        special_frac=st.sampled_from((0.0, 0.0, 0.01, 0.1, 0.5)),
    )


def tensor_specs(max_numel: int, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
                 layouts: Sequence[str] = LAYOUTS, allow_huge: bool = True) -> st.SearchStrategy[TSpec]:
    return st.builds(TSpec, shape=shapes(max_numel), layout=st.sampled_from(tuple(layouts)),
                     dtype=st.sampled_from(tuple(dtypes)), values=values(allow_huge))


def ragged(max_tensors: int, max_numel: int, min_tensors: int = 0, **kw) -> st.SearchStrategy[list]:
    """A list of 0..max_tensors tensor specs (ragged sizes, mixed dtypes and layouts)."""
    return st.lists(tensor_specs(max_numel, **kw), min_size=min_tensors, max_size=max_tensors)


def masks(allow_dense: bool = True) -> st.SearchStrategy[MaskSpec]:
    kinds = ("empty", "full", "random", "random", "clustered") + (("dense",) if allow_dense else ())
    return st.builds(MaskSpec, kind=st.sampled_from(kinds),
                     density=st.sampled_from((0.001, 0.05, 0.3, 0.5, 0.9, 0.999)))


seeds = st.integers(0, 2 ** 32 - 1)


# ----------------------------------------------------------------------------- builders
def specials(dtype: torch.dtype, nan: bool = True, inf: bool = True) -> torch.Tensor:
    """float32 values that are exact in ``dtype``: signed zeros, +-1, subnormals of ``dtype``, its
    smallest normal and largest finite value, and (when allowed) +-inf and NaN."""
    fi = torch.finfo(dtype)
    vals = [0.0, -0.0, 1.0, -1.0, fi.smallest_normal / 4, -fi.smallest_normal / 4,
            fi.smallest_normal, fi.max, -fi.max]
    if inf:
        vals += [float("inf"), float("-inf")]
    if nan:
        vals += [float("nan")]
    return torch.tensor(vals, dtype=torch.float32).to(dtype).float()


def fill(n: int, spec: Values, dtype: torch.dtype, gen: torch.Generator, nan: bool = True,
         inf: bool = True) -> torch.Tensor:
    """float32[n] values, exactly representable in ``dtype`` (cast there and back)."""
    fi = torch.finfo(dtype)
    if spec.mode == "ties":
        pool = torch.tensor(spec.pool or (0.0,), dtype=torch.float32)
        x = pool[torch.randint(0, pool.numel(), (n,), generator=gen)]
    elif spec.mode == "tiny":
        x = torch.randn(n, generator=gen) * fi.smallest_normal
    elif spec.mode == "huge":
        x = torch.randn(n, generator=gen) * (fi.max / 4)
    else:
        x = torch.randn(n, generator=gen) * (10.0 ** spec.scale_exp)
    if spec.special_frac and n:
        sp = specials(dtype, nan=nan, inf=inf)
        pick = torch.rand(n, generator=gen) < spec.special_frac
        x[pick] = sp[torch.randint(0, sp.numel(), (int(pick.sum()),), generator=gen)]
    x = x.to(dtype).float()
    if not inf:  # a finite float32 may still round to +-inf in fp16 / bf16
        x = torch.where(torch.isinf(x), torch.full_like(x, fi.max).copysign(x), x)
    return x


def layout(flat: torch.Tensor, shape: tuple, how: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A ``dtype`` tensor of logical ``shape`` holding ``flat`` (in flat order), laid out ``how``."""
    shape = tuple(shape)
    logical = flat.to(dtype).reshape(shape)
    if how == "transposed" and len(shape) == 2:
        return logical.t().contiguous().t()
    if how == "strided" and len(shape) >= 1:
        step = 2 + int(torch.randint(0, 2, (1,), generator=gen))
        off = int(torch.randint(0, step, (1,), generator=gen))
        base = torch.full(shape[:-1] + (shape[-1] * step + off,), 7.0, dtype=dtype)
        view = base[..., off::step][..., : shape[-1]]
        view.copy_(logical)
        return view
    if how in ("offset", "strided", "transposed"):  # offset (and the 0-/1-d fallbacks)
        off = 1 + int(torch.randint(0, 3, (1,), generator=gen))
        base = torch.full((logical.numel() + off,), 7.0, dtype=dtype)
        view = base[off:].view(shape)
        view.copy_(logical)
        return view
    return logical.contiguous()


def build_tensor(spec: TSpec, gen: torch.Generator, nan: bool = True, inf: bool = True,
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    dtype = dtype or spec.dtype
    flat = fill(spec.numel, spec.values, dtype, gen, nan=nan, inf=inf)
    return layout(flat, spec.shape, spec.layout, dtype, gen)


def build_mask(spec: MaskSpec, n: int, gen: torch.Generator) -> Optional[torch.Tensor]:
    """bool[n], or None for ``"dense"``."""
    if spec.kind == "dense":
        return None
    if spec.kind == "empty":
        return torch.zeros(n, dtype=torch.bool)
    if spec.kind == "full":
        return torch.ones(n, dtype=torch.bool)
    if spec.kind == "random":
        return torch.rand(n, generator=gen) < spec.density
    sel = torch.zeros(n, dtype=torch.bool)
    i = 0
    while i < n:
        run = int(torch.randint(1, 300, (1,), generator=gen))
        if bool(torch.rand(1, generator=gen) < spec.density):
            sel[i:i + run] = True
        i += run
    return sel
