"""MaskedAdamW: AdamW that updates only the weights selected by a mask, with compact state.

Why not ``p.grad *= mask`` + ``torch.optim.AdamW`` (WAGLE, SalUn)? That leaks (docs/kernels.md section 5,
docs/pitfalls.md K1-K2): decoupled weight decay still shrinks frozen weights by ``(1 - lr*wd)`` every step,
stale moments keep moving weights whose gradient is masked, and the optimizer stores 8 B of state
per weight whether it moves or not (56 GB at 7B parameters).

MaskedAdamW keeps ``exp_avg``/``exp_avg_sq`` (fp32) only for selected elements, addressed through a
per-4096-element directory built from the mask bits, and runs one fused pass per dtype
(``wagle::masked_adamw_``). Its arithmetic is torch's fused CPU AdamW (lerp form of ``exp_avg``,
bias corrections in double, eps after ``sqrt(v)/sqrt(bc2)``, decay ``p *= 1 - lr*wd`` before the
update), so a full mask with ``weight_decay_mode="all"`` reproduces ``torch.optim.AdamW(fused=True)``.

Conventions (torch's): decoupled decay is scaled by the scheduled ``lr`` (docs/pitfalls.md K5); ``eps`` is
added after the bias correction (docs/pitfalls.md K4, not the ``lr*sqrt(bc2)/bc1`` form of SparseAdam/SpIEL).

Compact gradients (``grad_mode="compact"``, docs/kernels.md 4.3 / SIFT, LOMO): autograd still produces
one dense gradient per parameter, but a ``register_post_accumulate_grad_hook`` compacts its
selected entries into a float32[nnz] buffer (``wagle::gather_masked_``, one pass) and frees
``p.grad`` at once, so at most one dense gradient is alive at a time instead of one per parameter
(4 B/param for fp32); parameters whose mask selects nothing get ``requires_grad_(False)`` and never
have a gradient. ``step_in_backward=True`` goes further (LOMO/SIFT): the hook applies the update of
that parameter right away, so no gradient outlives its hook.

Compact master weights (``master_weights``, default on for bf16/fp16 parameters): an fp32 copy of
the *selected* elements only, in the compact layout of the moments (12 B of state per selected
element, 0 per frozen one, instead of the 16 B/param of dense AdamW with master weights); the
update runs in fp32 on it and the low-precision weight is written back rounded to nearest even
(or stochastically, ``rounding="stochastic"``), so updates below half an ulp are not lost.

Distributed (FSDP2): a parameter that is a ``DTensor`` (``fully_shard``) is updated through its local
shard (``masks.sharding.local_tensor``); its mask, given whole or as the local piece, is cut to the
shard's rows (``shard_mask``), so each rank holds the bits and compact state of its own rows only,
and the ranks' compact states concatenated in rank order are exactly the single-process state.
Gradient norms of sharded parameters are all-reduced over their shard group (a collective).
Checkpoints across world sizes: ``wagle_ext.parallel.sharded_state_dict`` (DCP).

Long file: one class. The compact state, the mask directories, the gradient hooks, the step and the
checkpoint format share one invariant (state entry ``j`` of a parameter is its ``j``-th selected
element); split over modules, each part would have to re-derive it. The kernels and their argument
checks are in ``wagle_ext.ops``; the rules shared with the trainer and the config in ``_checks``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch

from . import ops
from ._checks import GRAD_MODES, ROUNDINGS, check_grad_mode, check_master_weights, check_weight_decay_mode
from .masks.sharding import is_dtensor, local_tensor, shard_mask, shard_range
from .ops import PackedMask

__all__ = ["MaskedAdamW", "GRAD_MODES", "ROUNDINGS"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_M64 = (1 << 64) - 1


def _param_seed(seed: int, index: int) -> int:
    """Stochastic-rounding seed of parameter ``index`` (its position in the optimizer), in [0, 2^63):
    splitmix64 of (seed, index), so parameters of equal shape draw different bits."""
    z = (seed + 0x9E3779B97F4A7C15 * (index + 1)) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) >> 1

MaskLike = Union[PackedMask, torch.Tensor, None]


def _to_packed(mask: MaskLike, param: torch.Tensor, what: str) -> Optional[PackedMask]:
    """``mask`` as a PackedMask over the tensor this process updates: the parameter, or for an
    FSDP2 DTensor its local shard (a whole-parameter mask is cut with ``shard_mask``; a mask of the
    local shape is taken as the local piece)."""
    if mask is None:
        return None
    local = local_tensor(param)
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"mask for {what} must be a PackedMask or a bool tensor, got {mask.dtype}")
        if mask.shape not in (param.shape, local.shape):
            raise ValueError(f"mask for {what} has shape {tuple(mask.shape)} but the parameter has shape "
                             f"{tuple(param.shape)}")
        mask = PackedMask.from_bool(mask)
    elif not isinstance(mask, PackedMask):
        raise TypeError(f"mask for {what} must be a PackedMask, a bool tensor or None, got {type(mask).__name__}")
    if local is not param and mask.shape == param.shape:
        mask = shard_mask(mask, param)
    if mask.shape != local.shape:
        raise ValueError(f"mask for {what} has shape {tuple(mask.shape)} but the parameter has shape "
                         f"{tuple(param.shape)}")
    if mask.bits.device != param.device:
        mask = mask.to(param.device)
    return mask


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW restricted to masked weights, with compact state; a drop-in ``torch.optim.Optimizer``.

    Args:
        params: parameters or param groups (as for ``torch.optim.AdamW``).
        masks: one mask per parameter, aligned with the flattened parameter order of ``params``
            (a sequence of :class:`PackedMask` / bool tensors shaped like the parameter / None), or
            None (every parameter dense). Use :meth:`from_model` for a ``{name: mask}`` dict or a
            :class:`~wagle_ext.masks.MaskSet` (and its ``missing=`` choice for uncovered parameters).
            A parameter without a mask is updated densely; one whose mask selects nothing costs
            nothing (``weight_decay_mode="all"`` still decays it).
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.
        weight_decay_mode: ``"masked"`` (default): decay only selected weights -- unselected
            weights are never read or written, so they stay bit-identical forever; ``"all"``:
            unselected weights also get ``p *= 1 - lr*wd`` -- exactly ``p.grad *= mask`` followed by
            torch AdamW with a fixed mask (their moments are zero there, so compact state is exact;
            only a weight that was selected under an earlier mask would, in torch, keep decaying
            moments, which ``set_masks`` drops by design); ``"none"``: no decay.
        grad_mode: ``"dense"`` (default): ``step()`` reads ``p.grad`` as any torch optimizer.
            ``"compact"``: hooks registered at construction compact each gradient into a float32
            buffer of the selected entries as soon as autograd has accumulated it, and free
            ``p.grad`` (it is None after every backward); gradients accumulate across backward
            calls (gradient accumulation) until ``step()`` or ``zero_grad()``. Parameters whose
            mask selects nothing are set ``requires_grad_(False)``. Same updates as dense mode
            (bit-identical for fp32 parameters; bf16/fp16 gradients accumulate in fp32 here).
            Clip with :meth:`clip_grad_norm_` (clipping the dense gradient before masking, WAGLE's
            order, needs dense mode). Under DDP the hook would see unreduced gradients: there
            ``wagle_ext.parallel.register_compact_ddp_hook`` compacts each bucket before its
            all-reduce instead; under FSDP2 the hook sees the reduce-scattered shard. Not with
            ``GradScaler`` or ``weight_decay_mode="all"``.
        step_in_backward: with ``grad_mode="compact"``: update each parameter inside its hook
            (LOMO/SIFT) with the group's current ``lr``; ``step()`` then has nothing left to do.
            Only without gradient accumulation and without clipping (each backward is one step).
        master_weights: keep an fp32 master copy of the selected elements of every bfloat16/float16
            parameter (compact, like the moments: 4 B per selected element, created from the
            weight at its first step). The update runs in fp32 on the master copy, exactly as for
            an fp32 parameter, and the weight is written back rounded; without it, updates below
            half an ulp of the weight (most of them at lr 1e-5 in bf16) round away. None (default)
            or True: on for bf16/fp16 parameters (fp32 parameters are their own master); False: off
            (the update reads and rounds the low-precision weight itself, as torch AdamW does).
            The master copy is authoritative: a weight changed outside the optimizer after its
            first step is overwritten at the next step unless :meth:`reset_master_weights` is called.
            Unselected weights have no master copy (``weight_decay_mode="all"`` decays them in
            their own dtype).
        rounding: how master weights are written back: ``"nearest"`` (round to nearest even) or
            ``"stochastic"`` (unbiased stochastic rounding, deterministic given ``seed``, the
            parameter's position and its step count; identical on every back end). Needs master
            weights.
        seed: stochastic-rounding seed, an int in [0, 2^63).

    State per parameter (``self.state[p]``): ``step`` (float32 scalar), ``exp_avg``,
    ``exp_avg_sq`` (and ``max_exp_avg_sq``) as float32[nnz] in flat order of the selected
    elements, ``master_weight`` (float32[nnz], bf16/fp16 parameters with master weights), and
    ``step_offsets`` (int32[nnz], only after :meth:`set_masks` added elements to a
    parameter that had already stepped: element ``j`` uses step ``step - step_offsets[j]``).
    Gradients of unselected elements are ignored (and, with GradScaler, left scaled).

    Parameters added later with ``add_param_group`` are dense until :meth:`set_masks` gives
    them a mask. Elements with their own step count (after :meth:`set_masks`) take the kernel's
    bit-by-bit path (slower than the vectorised one for dense-ish masks).

    Works with ``torch.amp.GradScaler`` (fused semantics: grads unscaled in the kernel, a step
    with inf/NaN gradients is skipped), ``torch.optim.lr_scheduler`` and ``transformers.Trainer``
    (``optimizers=(opt, scheduler)``).
    """

    def __init__(
        self,
        params: Iterable,
        masks: Optional[Sequence[MaskLike]] = None,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        maximize: bool = False,
        weight_decay_mode: str = "masked",
        grad_mode: str = "dense",
        step_in_backward: bool = False,
        master_weights: Optional[bool] = None,
        rounding: str = "nearest",
        seed: int = 0,
    ):
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if not isinstance(lr, (int, float)) or not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: lr must be >= 0, got {lr}")
        if not isinstance(eps, (int, float)) or not eps >= 0.0:
            raise ValueError(f"Invalid eps: must be >= 0, got {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid betas: both must be in [0, 1), got {betas}")
        if not isinstance(weight_decay, (int, float)) or not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay: must be >= 0, got {weight_decay}")
        check_weight_decay_mode(weight_decay_mode)
        check_grad_mode(grad_mode, step_in_backward, weight_decay_mode)
        check_master_weights(master_weights, rounding, seed)
        self.master_weights = master_weights is not False
        self.rounding = rounding
        self.seed = seed
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, weight_decay_mode=weight_decay_mode)
        super().__init__(params, defaults)
        # GradScaler: set grad_scale / found_inf on the optimizer and let step() use them.
        self._step_supports_amp_scaling = True
        self._masks: dict = {}
        self._dirs: dict = {}
        self._nnzs: dict = {}
        self._assign_masks(masks)
        self.grad_mode = grad_mode
        self.step_in_backward = bool(step_in_backward)
        self._cgrads: dict = {}       # param -> float32[nnz] compact gradient buffer
        self._cgrad_ready: set = set()  # params whose buffer holds this step's gradient
        self._hooks: dict = {}        # param -> hook handle (compact mode)
        self._hold = False            # accumulate_only(): step_in_backward hooks only accumulate
        self._frozen: set = set()     # params this optimizer set requires_grad_(False)
        self._reduced_externally = False  # DDP: a comm hook compacts (wagle_ext.parallel.ddp)
        self._sync_hooks()

    # ------------------------------------------------------------------ construction helpers
    def _all_params(self) -> list:
        return [p for g in self.param_groups for p in g["params"]]

    def _assign_masks(self, masks: Optional[Sequence[MaskLike]]) -> None:
        plist = self._all_params()
        if masks is None:
            masks = [None] * len(plist)
        if isinstance(masks, Mapping):
            raise TypeError("masks must be a sequence aligned with params; for a {name: mask} dict use "
                            "MaskedAdamW.from_model(model, masks, ...)")
        masks = list(masks)
        if len(masks) != len(plist):
            raise ValueError(f"masks has {len(masks)} entries but there are {len(plist)} parameters")
        for i, (p, m) in enumerate(zip(plist, masks)):
            self._masks[p] = _to_packed(m, p, f"parameter {i}")
            self._dirs.pop(p, None)
            self._nnzs.pop(p, None)

    @classmethod
    def from_model(cls, model: torch.nn.Module, masks: Mapping[str, MaskLike], *, missing: Optional[str] = None,
                   **kwargs: Any) -> "MaskedAdamW":
        """Optimizer over ``model``'s trainable parameters with masks keyed by parameter name.

        On an FSDP2 model (``fully_shard``: DTensor parameters) pass the whole-parameter masks (the
        same MaskSet on every rank): each rank keeps the piece of its own shard.

        Args:
            model: the module whose ``requires_grad`` parameters are optimised.
            masks: ``{model.named_parameters() name: PackedMask / bool tensor / None}`` (None entry =
                dense), or a :class:`~wagle_ext.masks.MaskSet` (names normalised, checked against
                the model with :meth:`MaskSet.for_model`; PEFT adapter weights are outside it and dense).
                A name that is not a trainable parameter raises ``KeyError``.
            missing: what happens to trainable parameters WITHOUT an entry: ``"dense"`` (updated
                normally) or ``"frozen"`` (an all-zero mask in a group without weight decay: never
                updated, bit-identical even with ``weight_decay_mode="all"``; no gradient in compact
                mode). None (default) = ``masks.missing`` for a MaskSet, ``"dense"`` for a plain dict
                (this method's behaviour before ``missing`` existed).
            kwargs: the constructor's arguments (``lr``, ``weight_decay``, ``grad_mode``, ...).
        """
        from .masks import MaskSet
        from .naming import is_adapter_param

        adapters_dense = False
        if isinstance(masks, MaskSet):
            if missing is None:
                missing = masks.missing
            masks = masks.for_model(model)
            adapters_dense = True
        if missing is None:
            missing = "dense"
        if missing not in ("dense", "frozen"):
            raise ValueError(f"missing must be 'frozen' or 'dense', got {missing!r}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        names = {n for n, _ in named}
        unknown = [k for k in masks if k not in names]
        if unknown:
            raise KeyError(f"masks given for parameters that the model does not have (or that are frozen): "
                           f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        covered, frozen = [], []
        for n, p in named:
            if n in masks or missing == "dense" or (adapters_dense and is_adapter_param(n)):
                covered.append((n, p))
            else:
                frozen.append(p)
        params = [p for _, p in covered]
        aligned = []
        for n, p in covered:
            m = masks.get(n)
            aligned.append(_to_packed(m, p, repr(n)) if m is not None else None)
        if frozen:
            if not covered:
                raise ValueError("every trainable parameter is frozen (no mask entry and missing='frozen')")
            wd = kwargs.get("weight_decay", 1e-2)
            params = [{"params": params, "weight_decay": wd}, {"params": frozen, "weight_decay": 0.0}]
            aligned += [PackedMask.full(local_tensor(p).shape, False, device=p.device) for p in frozen]
        return cls(params, masks=aligned, **kwargs)

    # ------------------------------------------------------------------ masks
    def mask_of(self, param: torch.Tensor) -> Optional[PackedMask]:
        """The PackedMask of ``param`` (None: dense)."""
        return self._masks.get(param)

    def _directory(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        mask = self._masks.get(p)
        if mask is None:
            return None
        d = self._dirs.get(p)
        if d is None:
            d = ops.masked_adamw_chunk_offsets(mask.bits, mask.numel)
            self._dirs[p] = d
        return d

    def _nnz(self, p: torch.Tensor) -> int:
        d = self._directory(p)
        if d is None:
            return local_tensor(p).numel()
        nnz = self._nnzs.get(p)
        if nnz is None:
            nnz = self._nnzs[p] = int(d[-1])
        return nnz

    @torch.no_grad()
    def set_masks(self, masks: Sequence[MaskLike]) -> None:
        """Replace the masks (aligned with the parameters, like ``masks=`` of the constructor) and
        remap the compact state: entries selected before and after keep their moments, master
        weight and step; new entries start at zero moments with their own step count (per-element
        bias correction, as SpIEL's ``age``) and a master weight equal to the current weight;
        dropped entries are forgotten (their weight keeps its last rounded value)."""
        plist = self._all_params()
        masks = list(masks)
        if len(masks) != len(plist):
            raise ValueError(f"masks has {len(masks)} entries but there are {len(plist)} parameters")
        for i, (p, m) in enumerate(zip(plist, masks)):
            new = _to_packed(m, p, f"parameter {i}")
            old = self._masks.get(p)
            state = self.state.get(p)
            self._masks[p] = new
            self._dirs.pop(p, None)
            self._nnzs.pop(p, None)
            self._cgrads.pop(p, None)  # a pending compact gradient has the old mask's layout
            self._cgrad_ready.discard(p)
            if not state:
                continue
            n = local_tensor(p).numel()
            old_sel = old.to_bool().view(-1) if old is not None else torch.ones(n, dtype=torch.bool, device=p.device)
            new_sel = new.to_bool().view(-1) if new is not None else torch.ones(n, dtype=torch.bool, device=p.device)
            step = float(state["step"])
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state:
                    full = torch.zeros(n, dtype=torch.float32, device=p.device)
                    full[old_sel] = state[key]
                    state[key] = full[new_sel].contiguous()
            if "master_weight" in state:
                # kept entries keep their fp32 value; new ones start from the current weight
                full = local_tensor(p).detach().reshape(-1).float()
                full[old_sel] = state["master_weight"]
                state["master_weight"] = full[new_sel].contiguous()
            old_offs = state.get("step_offsets")
            full = torch.full((n,), int(step), dtype=torch.int32, device=p.device)
            if old_offs is not None:
                full[old_sel] = old_offs
            else:
                full[old_sel] = 0
            offs = full[new_sel].contiguous()
            if bool((offs == 0).all()):
                state.pop("step_offsets", None)
            else:
                state["step_offsets"] = offs
        self._sync_hooks()

    # ------------------------------------------------------------------ accounting
    def state_bytes(self) -> dict:
        """Bytes held by the optimizer: ``masks`` (bits), ``directory``, ``moments`` (exp_avg,
        exp_avg_sq, max_exp_avg_sq), ``master_weights`` (compact fp32 copies), ``step_offsets``
        and ``total``."""
        out = {"masks": 0, "directory": 0, "moments": 0, "master_weights": 0, "step_offsets": 0}
        for p in self._all_params():
            mask = self._masks.get(p)
            if mask is not None:
                out["masks"] += mask.bits.numel()
                out["directory"] += self._directory(p).numel() * 8
            st = self.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in st:
                    out["moments"] += st[key].numel() * st[key].element_size()
            if "master_weight" in st:
                out["master_weights"] += st["master_weight"].numel() * 4
            if "step_offsets" in st:
                out["step_offsets"] += st["step_offsets"].numel() * 4
        out["total"] = sum(out.values())
        return out

    # ------------------------------------------------------------------ compact gradients
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_hooks"):  # not during __init__: the masks are assigned after the groups
            for p in param_group["params"]:
                self._masks.setdefault(p, None)
            self._group_of = {}
            self._index_of = None
            self._sync_hooks()

    def _sync_hooks(self) -> None:
        """Compact mode: a hook on every parameter that can move; ``requires_grad_(False)`` on
        those whose mask selects nothing (LISA-style freeze: autograd computes no gradient)."""
        if self.grad_mode != "compact":
            return
        for p in self._all_params():
            if not p.requires_grad and p not in self._frozen:
                continue  # frozen by the user: leave it alone
            movable = self._masks.get(p) is None or self._nnz(p) > 0
            if movable and p not in self._hooks:
                if p in self._frozen:
                    self._frozen.discard(p)
                    p.requires_grad_(True)
                self._hooks[p] = p.register_post_accumulate_grad_hook(self._grad_hook)
                if self._masks.get(p) is not None:
                    # Allocate the compact buffer now, not between two dense gradients in the first
                    # backward, where long-lived small blocks fragment the heap those come from.
                    # (step_in_backward needs it too: for all but the last backward of a step.)
                    self._cgrads[p] = torch.empty(self._nnz(p), dtype=torch.float32, device=p.device)
            elif not movable and p.requires_grad:
                h = self._hooks.pop(p, None)
                if h is not None:
                    h.remove()
                p.requires_grad_(False)
                self._frozen.add(p)

    def detach_hooks(self) -> None:
        """Remove the compact-gradient hooks and give back ``requires_grad`` to the parameters this
        optimizer froze (then the model trains as without it)."""
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()
        for p in self._frozen:
            p.requires_grad_(True)
        self._frozen.clear()
        self._cgrads.clear()
        self._cgrad_ready.clear()
        self.grad_mode = "dense"
        self.step_in_backward = False
        self._reduced_externally = False

    @contextlib.contextmanager
    def accumulate_only(self):
        """With ``step_in_backward``: inside this context the hooks only accumulate compact
        gradients; the first backward after it updates each parameter with the accumulated plus
        its new gradient (for losses backpropagated one term at a time). A parameter that no later
        backward reaches is updated by :meth:`step`."""
        held, self._hold = self._hold, True
        try:
            yield self
        finally:
            self._hold = held

    @torch.no_grad()
    def _grad_hook(self, p: torch.Tensor) -> None:
        g = p.grad
        if g is None or self._reduced_externally:
            return
        if g.is_sparse:
            raise TypeError("MaskedAdamW does not support sparse gradients")
        if self.step_in_backward and not self._hold:
            if p in self._cgrad_ready:  # earlier terms of this step were accumulated
                self._gather(p, g, accumulate=True)
                self._cgrad_ready.discard(p)
                self._step_now(p, self._cgrads[p], compact=True)
            else:
                self._step_now(p, g, compact=False)
            p.grad = None
            return
        self._gather(p, g, accumulate=p in self._cgrad_ready)
        self._cgrad_ready.add(p)
        p.grad = None

    def _gather(self, p: torch.Tensor, g: torch.Tensor, accumulate: bool) -> None:
        """Compact ``g`` (the dense gradient of ``p``) into ``p``'s buffer, or add it there."""
        g = local_tensor(g)  # FSDP2: the reduce-scattered shard
        mask = self._masks.get(p)
        if mask is None:
            if accumulate:
                self._cgrads[p].add_(g.reshape(-1))
            elif g.dtype == torch.float32 and g.is_contiguous():
                self._cgrads[p] = g.reshape(-1)  # take autograd's buffer: no copy
            else:
                self._cgrads[p] = g.reshape(-1).float().contiguous()
        else:
            buf = self._cgrads.get(p)
            if buf is None or buf.device != p.device:
                buf = self._cgrads[p] = torch.empty(self._nnz(p), dtype=torch.float32, device=p.device)
            # Shapes were validated when the mask was set: the ops may skip their Python checks.
            ops.gather_masked_prevalidated_(buf, g, mask.bits, self._directory(p), accumulate)

    def compact_grad(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """The accumulated compact gradient of ``param`` since the last step: float32[nnz] in flat
        order of the selected elements (float32[numel] for a parameter without a mask), or None
        (dense mode, or no backward reached it yet). Changing it in place changes the next step."""
        return self._cgrads.get(param) if param in self._cgrad_ready else None

    def compact_grad_bytes(self) -> int:
        """Bytes held by the compact gradient buffers (kept between steps and reused)."""
        return sum(b.numel() * b.element_size() for b in self._cgrads.values())

    def _pending_grads(self) -> tuple:
        """(gradients to scale, squared-norm parts counting only the weights that move), in
        parameter order: the compact buffers in compact mode; in dense mode every ``p.grad``, with
        its norm restricted to the selected elements (a compact buffer holds exactly those, in the
        same order, so both modes give the same norm). A part is ``(squared sum, process group)``:
        the group over which an FSDP2 parameter is sharded (its parts are summed over it), else None."""
        targets, parts = [], []
        for p in self._all_params():
            group = self._shard_group(p)
            if self.grad_mode == "compact":
                g = self.compact_grad(p)
                if g is None or g.numel() == 0:
                    continue
                targets.append(g)
                parts.append((g.pow(2).sum(), group))
                continue
            if p.grad is None:
                continue
            grad = local_tensor(p.grad)
            mask = self._masks.get(p)
            targets.append(grad)
            if mask is None:
                parts.append((grad.detach().float().pow(2).sum(), group))
            elif self._nnz(p):
                parts.append((grad.detach().reshape(-1)[mask.to_bool().reshape(-1)].float().pow(2).sum(), group))
        return targets, parts

    def _shard_group(self, p: torch.Tensor):
        """The process group over which ``p`` is sharded (FSDP2 DTensor), or None."""
        groups = getattr(self, "_groups_of", None)
        if groups is None:
            groups = self._groups_of = {}
        if p not in groups:
            groups[p] = shard_range(p).group if is_dtensor(p) else None
        return groups[p]

    def _total(self, parts: list) -> torch.Tensor:
        """L2 norm of the parts; the parts of sharded parameters are summed over their process group
        first (one all-reduce per group, on every rank even when it has nothing of its own, so the
        collectives match)."""
        sq = None
        by_group: dict = {}
        for part, group in parts:
            if group is None:
                sq = part if sq is None else sq + part.to(sq.device)
            else:
                by_group[group] = part if group not in by_group else by_group[group] + part.to(by_group[group].device)
        groups = []
        for p in self._all_params():
            g = self._shard_group(p)
            if g is not None and g not in groups:
                groups.append(g)
        if groups:
            import torch.distributed as dist

            for g in groups:
                device = next(local_tensor(p).device for p in self._all_params() if self._shard_group(p) is g)
                part = by_group.get(g, torch.zeros((), dtype=torch.float32, device=device)).float().reshape(1)
                dist.all_reduce(part, group=g)
                sq = part[0] if sq is None else sq + part[0].to(sq.device)
        return torch.tensor(0.0) if sq is None else sq.sqrt()

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """L2 norm of the pending gradients over the weights that move (see :meth:`clip_grad_norm_`),
        float32 scalar; nothing is changed. Under FSDP2 the norm is over every rank's shards (a
        collective: call it on every rank)."""
        return self._total(self._pending_grads()[1])

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
        """Scale the pending gradients so that their total L2 norm is at most ``max_norm``, as
        ``torch.nn.utils.clip_grad_norm_`` does (``coef = min(1, max_norm / (norm + eps))``), counting
        only the weights that move: the compact buffers in compact mode, ``p.grad`` restricted to
        the selected elements in dense mode. Returns the norm before clipping (float32 scalar).
        Under FSDP2 the norm is over every rank's shards (a collective: call it on every rank)."""
        targets, parts = self._pending_grads()
        total = self._total(parts)
        if not targets:
            return total
        coef = torch.clamp(max_norm / (total + eps), max=1.0)
        for g in targets:
            g.mul_(coef.to(g.device, g.dtype))
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``; in compact mode it also drops the pending compact
        gradients (the next backward starts a new accumulation)."""
        super().zero_grad(set_to_none=set_to_none)
        self._cgrad_ready.clear()

    def _step_now(self, p: torch.Tensor, g: torch.Tensor, compact: bool) -> None:
        """step_in_backward: one masked AdamW step of ``p`` alone, with its gradient ``g`` (dense,
        or compact float32[nnz])."""
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            raise RuntimeError("MaskedAdamW(step_in_backward=True) does not support GradScaler")
        group = getattr(self, "_group_of", {}).get(p)
        if group is None:
            self._group_of = {q: grp for grp in self.param_groups for q in grp["params"]}
            group = self._group_of[p]
        self._step_group(group, [(p, g)], compact=compact, grad_scale=None, found_inf=None)

    # ------------------------------------------------------------------ master weights
    def uses_master_weights(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is updated through an fp32 master copy (bf16/fp16 with master weights on)."""
        return self.master_weights and param.dtype in _LOW_PRECISION

    def master_weight(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """The compact fp32 master copy of ``param`` (float32[nnz], selected elements in flat order;
        float32[numel] for a parameter without a mask), or None before its first step / without one.
        Changing it in place changes the next step's starting point."""
        return self.state.get(param, {}).get("master_weight")

    @torch.no_grad()
    def reset_master_weights(self) -> None:
        """Drop the master copies: each is rebuilt from its (rounded) weight at the parameter's next
        step. Call after changing weights outside the optimizer (e.g. loading model weights)."""
        for st in self.state.values():
            st.pop("master_weight", None)

    def _initial_master(self, p: torch.Tensor) -> torch.Tensor:
        """The master copy of ``p``'s selected elements, from the weight itself (exact widening)."""
        mask = self._masks.get(p)
        if mask is None:
            return local_tensor(p).detach().reshape(-1).float().contiguous()  # a new tensor: p is bf16/fp16
        return ops.gather_masked(local_tensor(p).detach(), mask.bits, self._directory(p))

    def _param_index(self, p: torch.Tensor) -> int:
        idx = getattr(self, "_index_of", None)
        if idx is None or p not in idx:
            idx = self._index_of = {q: i for i, q in enumerate(self._all_params())}
        return idx[p]

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on every parameter that has a gradient (``p.grad``, or in compact mode a
        compact gradient accumulated since the last step). Returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        compact = self.grad_mode == "compact"
        if compact and (grad_scale is not None or found_inf is not None):
            raise RuntimeError("MaskedAdamW(grad_mode='compact') does not support GradScaler: use bf16 or fp32, "
                               "or grad_mode='dense'")
        for group in self.param_groups:
            if compact:
                pairs = [(p, self._cgrads[p]) for p in group["params"] if p in self._cgrad_ready]
            else:
                pairs = [(p, p.grad) for p in group["params"] if p.grad is not None]
            self._step_group(group, pairs, compact=compact, grad_scale=grad_scale, found_inf=found_inf)
        self._cgrad_ready.clear()
        return loss

    def _step_group(self, group: dict, pairs: list, compact: bool, grad_scale, found_inf) -> None:
        """One step of the (param, grad) pairs of ``group``; ``compact``: grads are float32[nnz]."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: lr must be >= 0, got {lr}")
        mode = group["weight_decay_mode"]
        beta1, beta2 = group["betas"]
        amsgrad = group["amsgrad"]
        by_key: dict = {}
        for p, grad in pairs:
            if grad.is_sparse:
                raise TypeError("MaskedAdamW does not support sparse gradients")
            d = self._directory(p)
            nnz = self._nnz(p)
            if nnz == 0 and not (mode == "all" and group["weight_decay"] != 0):
                continue  # an all-zero mask costs nothing
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros(nnz, dtype=torch.float32, device=p.device)
                state["exp_avg_sq"] = torch.zeros(nnz, dtype=torch.float32, device=p.device)
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros(nnz, dtype=torch.float32, device=p.device)
            elif amsgrad and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros(nnz, dtype=torch.float32, device=p.device)
            master = self.uses_master_weights(p)
            if master and "master_weight" not in state:
                state["master_weight"] = self._initial_master(p)
            lst = by_key.setdefault((p.device, p.dtype), {k: [] for k in (
                "p", "g", "m", "v", "vmax", "step", "bits", "dir", "offs", "mw", "seed")})
            mask = self._masks.get(p)
            lst["p"].append(local_tensor(p))  # FSDP2: update this process's shard in place
            lst["g"].append(local_tensor(grad))
            lst["m"].append(state["exp_avg"])
            lst["v"].append(state["exp_avg_sq"])
            if amsgrad:
                lst["vmax"].append(state["max_exp_avg_sq"])
            lst["step"].append(state["step"])
            lst["bits"].append(None if mask is None else mask.bits)
            lst["dir"].append(d)
            lst["offs"].append(state.get("step_offsets"))
            if master:
                lst["mw"].append(state["master_weight"])
                lst["seed"].append(_param_seed(self.seed, self._param_index(p)))
        for (device, _), lst in by_key.items():
            steps = lst["step"]
            torch._foreach_add_(steps, 1)
            gs = grad_scale.to(device) if grad_scale is not None else None
            fi = found_inf.to(device) if found_inf is not None else None
            hyper = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2),
                         weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
                         amsgrad=amsgrad, maximize=group["maximize"], weight_decay_mode=mode,
                         grad_scale=gs, found_inf=fi)
            # The lists were built here from validated masks and state: the ops may skip their
            # Python checks (the kernels still check sizes and dtypes).
            sr = self.rounding == "stochastic" and bool(lst["mw"])
            ops.masked_adamw_prevalidated_(lst["p"], lst["g"], lst["m"], lst["v"], lst["vmax"], steps, lst["bits"],
                                           lst["dir"], lst["offs"], compact_grads=compact,
                                           master_weights=lst["mw"] or None,
                                           rounding_seeds=lst["seed"] if sr else None, **hyper)
            if fi is not None:
                # torch's fused path: undo the step increment of a skipped step.
                torch._foreach_sub_(steps, [fi.to(steps[0].device, torch.float32)] * len(steps))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """torch's layout (``state`` keyed by parameter index, ``param_groups``) plus ``masks``:
        ``{index: {"bits": uint8, "shape": list} or None}``. The compact state keeps checkpoints
        small; the directories are rebuilt on load."""
        sd = super().state_dict()
        masks = {}
        for i, p in enumerate(self._all_params()):
            m = self._masks.get(p)
            masks[i] = None if m is None else {"bits": m.bits, "shape": list(m.shape)}
        sd["masks"] = masks
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a :meth:`state_dict` (masks included). State tensors keep their dtypes (the compact
        fp32 moments are not cast to the parameter dtype, unlike torch's default policy)."""
        if "masks" not in state_dict:
            raise ValueError("state_dict has no 'masks' entry: it was not saved by MaskedAdamW.state_dict() (torch's "
                             "get_optimizer_state_dict, which FSDP2 checkpoints use, drops it: save and load "
                             "with wagle_ext.parallel.sharded_state_dict instead)")
        raw_state = state_dict["state"]
        stripped = dict(state_dict)
        stripped["state"] = {}
        super().load_state_dict({"state": {}, "param_groups": stripped["param_groups"]})
        plist = self._all_params()
        saved_masks = state_dict["masks"]
        if len(saved_masks) != len(plist):
            raise ValueError(f"state_dict has masks for {len(saved_masks)} parameters, optimizer has {len(plist)}")
        for i, p in enumerate(plist):
            entry = saved_masks.get(i, saved_masks.get(str(i)))
            if entry is None:
                self._masks[p] = None
            else:
                self._masks[p] = _to_packed(PackedMask(entry["bits"].to(p.device), entry["shape"]), p,
                                            f"parameter {i}")
            self._dirs.pop(p, None)
            self._nnzs.pop(p, None)
        self.state.clear()
        for key, st in raw_state.items():
            i = int(key)
            if i >= len(plist):
                raise ValueError(f"state_dict has state for parameter {i}, optimizer has {len(plist)}")
            p = plist[i]
            nnz = self._nnz(p)
            new = {}
            for k, v in st.items():
                if k == "step":
                    new[k] = v.detach().to(torch.float32).cpu().clone()
                else:
                    new[k] = v.detach().to(p.device).clone()
                    if k != "step_offsets" and (new[k].dtype != torch.float32 or new[k].numel() != nnz):
                        raise ValueError(f"state_dict state[{i}][{k!r}] has {new[k].numel()} entries of "
                                         f"{new[k].dtype}, the mask selects {nnz} (float32)")
            self.state[p] = new
        self._cgrads.clear()
        self._cgrad_ready.clear()
        self._sync_hooks()
