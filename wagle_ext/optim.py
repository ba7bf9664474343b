"""MaskedAdamW: AdamW that updates only the weights selected by a mask, with compact state.

Why not ``p.grad *= mask`` + ``torch.optim.AdamW`` (WAGLE, SalUn)? That leaks (kernels.md section 5,
pitfalls 1-2): decoupled weight decay still shrinks frozen weights by ``(1 - lr*wd)`` every step,
stale moments keep moving weights whose gradient is masked, and the optimizer stores 8 B of state
per weight whether it moves or not (56 GB at 7B parameters).

MaskedAdamW keeps ``exp_avg``/``exp_avg_sq`` (fp32) only for selected elements, addressed through a
per-4096-element directory built from the mask bits, and runs one fused pass per dtype
(``wagle::masked_adamw_``). Its arithmetic is torch's fused CPU AdamW (lerp form of ``exp_avg``,
bias corrections in double, eps after ``sqrt(v)/sqrt(bc2)``, decay ``p *= 1 - lr*wd`` before the
update), so a full mask with ``weight_decay_mode="all"`` reproduces ``torch.optim.AdamW(fused=True)``.

Conventions (torch's): decoupled decay is scaled by the scheduled ``lr`` (pitfall 5); ``eps`` is
added after the bias correction (pitfall 4, not the ``lr*sqrt(bc2)/bc1`` form of SparseAdam/SpIEL).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch

from . import ops
from .packed_mask import PackedMask

__all__ = ["MaskedAdamW"]

MaskLike = Union[PackedMask, torch.Tensor, None]


def _to_packed(mask: MaskLike, param: torch.Tensor, what: str) -> Optional[PackedMask]:
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"mask for {what} must be a PackedMask or a bool tensor, got {mask.dtype}")
        if mask.shape != param.shape:
            raise ValueError(f"mask for {what} has shape {tuple(mask.shape)} but the parameter has shape "
                             f"{tuple(param.shape)}")
        mask = PackedMask.from_bool(mask)
    elif not isinstance(mask, PackedMask):
        raise TypeError(f"mask for {what} must be a PackedMask, a bool tensor or None, got {type(mask).__name__}")
    if mask.shape != param.shape:
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
            None (every parameter dense). Use :meth:`from_model` for a ``{name: mask}`` dict.
            A parameter without a mask is updated densely; one whose mask selects nothing costs
            nothing (``weight_decay_mode="all"`` still decays it).
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.
        weight_decay_mode: ``"masked"`` (default): decay only selected weights -- unselected
            weights are never read or written, so they stay bit-identical forever; ``"all"``:
            unselected weights also get ``p *= 1 - lr*wd`` -- exactly ``p.grad *= mask`` followed by
            torch AdamW with a fixed mask (their moments are zero there, so compact state is exact;
            only a weight that was selected under an earlier mask would, in torch, keep decaying
            moments, which ``set_masks`` drops by design); ``"none"``: no decay.

    State per parameter (``self.state[p]``): ``step`` (float32 scalar), ``exp_avg``,
    ``exp_avg_sq`` (and ``max_exp_avg_sq``) as float32[nnz] in flat order of the selected
    elements, and ``step_offsets`` (int32[nnz], only after :meth:`set_masks` added elements to a
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
        if weight_decay_mode not in ops.WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {ops.WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, weight_decay_mode=weight_decay_mode)
        super().__init__(params, defaults)
        # GradScaler: set grad_scale / found_inf on the optimizer and let step() use them.
        self._step_supports_amp_scaling = True
        self._masks: dict = {}
        self._dirs: dict = {}
        self._nnzs: dict = {}
        self._assign_masks(masks)

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
    def from_model(cls, model: torch.nn.Module, masks: Mapping[str, MaskLike], **kwargs: Any) -> "MaskedAdamW":
        """Optimizer over ``model``'s trainable parameters with masks keyed by parameter name
        (``model.named_parameters()`` names). Parameters without an entry are updated densely;
        a name that is not a trainable parameter raises ``KeyError``."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        names = {n for n, _ in named}
        missing = [k for k in masks if k not in names]
        if missing:
            raise KeyError(f"masks given for parameters that the model does not have (or that are frozen): "
                           f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        params = [p for _, p in named]
        aligned = []
        for n, p in named:
            m = masks.get(n)
            aligned.append(_to_packed(m, p, repr(n)) if m is not None else None)
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
            return p.numel()
        nnz = self._nnzs.get(p)
        if nnz is None:
            nnz = self._nnzs[p] = int(d[-1])
        return nnz

    @torch.no_grad()
    def set_masks(self, masks: Sequence[MaskLike]) -> None:
        """Replace the masks (aligned with the parameters, like ``masks=`` of the constructor) and
        remap the compact state: entries selected before and after keep their moments (and step);
        new entries start at zero moments with their own step count (per-element bias correction,
        as SpIEL's ``age``); dropped entries are forgotten."""
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
            if not state:
                continue
            n = p.numel()
            old_sel = old.to_bool().view(-1) if old is not None else torch.ones(n, dtype=torch.bool, device=p.device)
            new_sel = new.to_bool().view(-1) if new is not None else torch.ones(n, dtype=torch.bool, device=p.device)
            step = float(state["step"])
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state:
                    full = torch.zeros(n, dtype=torch.float32, device=p.device)
                    full[old_sel] = state[key]
                    state[key] = full[new_sel].contiguous()
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

    # ------------------------------------------------------------------ accounting
    def state_bytes(self) -> dict:
        """Bytes held by the optimizer: ``masks`` (bits), ``directory``, ``moments`` (exp_avg,
        exp_avg_sq, max_exp_avg_sq), ``step_offsets`` and ``total``."""
        out = {"masks": 0, "directory": 0, "moments": 0, "step_offsets": 0}
        for p in self._all_params():
            mask = self._masks.get(p)
            if mask is not None:
                out["masks"] += mask.bits.numel()
                out["directory"] += self._directory(p).numel() * 8
            st = self.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in st:
                    out["moments"] += st[key].numel() * st[key].element_size()
            if "step_offsets" in st:
                out["step_offsets"] += st["step_offsets"].numel() * 4
        out["total"] = sum(out.values())
        return out

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step on every parameter that has a gradient. Returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                lr = float(lr)
            if not lr >= 0.0:
                raise ValueError(f"Invalid learning rate: lr must be >= 0, got {lr}")
            mode = group["weight_decay_mode"]
            beta1, beta2 = group["betas"]
            amsgrad = group["amsgrad"]
            by_key: dict = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
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
                lst = by_key.setdefault((p.device, p.dtype), {k: [] for k in (
                    "p", "g", "m", "v", "vmax", "step", "bits", "dir", "offs")})
                mask = self._masks.get(p)
                lst["p"].append(p)
                lst["g"].append(p.grad)
                lst["m"].append(state["exp_avg"])
                lst["v"].append(state["exp_avg_sq"])
                if amsgrad:
                    lst["vmax"].append(state["max_exp_avg_sq"])
                lst["step"].append(state["step"])
                lst["bits"].append(None if mask is None else mask.bits)
                lst["dir"].append(d)
                lst["offs"].append(state.get("step_offsets"))
            for (device, _), lst in by_key.items():
                steps = lst["step"]
                torch._foreach_add_(steps, 1)
                gs = grad_scale.to(device) if grad_scale is not None else None
                fi = found_inf.to(device) if found_inf is not None else None
                hyper = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2),
                             weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
                             amsgrad=amsgrad, maximize=group["maximize"], weight_decay_mode=mode,
                             grad_scale=gs, found_inf=fi)
                if (ops.resolve_backend("masked_adamw_", device) == "cpp"
                        and all(p.is_contiguous() and g.is_contiguous() for p, g in zip(lst["p"], lst["g"]))):
                    # The lists were built here from validated masks and state: skip the Python
                    # checks of ops.masked_adamw_ (the C++ op still checks sizes and dtypes), which
                    # matter at low density where the kernel itself takes a few ms.
                    e8 = torch.empty(0, dtype=torch.uint8, device=device)
                    e64 = torch.empty(0, dtype=torch.int64, device=device)
                    e32 = torch.empty(0, dtype=torch.int32, device=device)
                    torch.ops.wagle.masked_adamw_(
                        lst["p"], lst["g"], lst["m"], lst["v"], lst["vmax"], steps,
                        [e8 if b is None else b for b in lst["bits"]], [e64 if d is None else d for d in lst["dir"]],
                        [e32 if o is None else o for o in lst["offs"]], torch_tail=ops.torch_fused_adamw_tail(),
                        **hyper)
                else:
                    ops.masked_adamw_(lst["p"], lst["g"], lst["m"], lst["v"], lst["vmax"], steps, lst["bits"],
                                      lst["dir"], lst["offs"], **hyper)
                if fi is not None:
                    # torch's fused path: undo the step increment of a skipped step.
                    torch._foreach_sub_(steps, [fi.to(steps[0].device, torch.float32)] * len(steps))
        return loss

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
            raise ValueError("state_dict has no 'masks' entry: it was not saved by MaskedAdamW.state_dict()")
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
