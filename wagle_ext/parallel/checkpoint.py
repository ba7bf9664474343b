"""MaskedAdamW state for ``torch.distributed.checkpoint`` (DCP), reshardable across world sizes.

The compact state of an FSDP2 rank (float32[nnz of its shard]) has a length that depends on the
mask, so it is not a shard of any tensor DCP knows how to cut again. :func:`sharded_state_dict`
therefore writes each state tensor *expanded to the parameter's shape and placement* (zeros at
unselected elements) together with the mask as a bool tensor of the same placement: DCP sees
ordinary DTensors (or plain tensors without FSDP) and reshards them by overlap like the model's
weights. :func:`load_sharded_state_dict` cuts the loaded pieces back to the compact layout of the
mask this process now holds. The optimizer's memory stays compact, but the dict built for a save
or a load holds this rank's expanded state at once, on the parameters' device (1 B of mask + 4 B
per state tensor per element of its shards, e.g. 9 B/element for fp32 moments): build it right
before ``dcp.save`` / ``dcp.load`` and drop it after.

Bytes on disk per element: 1 (mask) + 4 per state tensor (``exp_avg``, ``exp_avg_sq``, and
``max_exp_avg_sq`` / ``master_weight`` when used) -- a checkpoint is as large as dense AdamW's, the
price of resharding with DCP's own planner. ``MaskedAdamW.state_dict()`` stays the compact,
same-world-size format.

Usage (every rank; the same code at any world size, FSDP2 or not)::

    sd = {"model": model.state_dict(), "optim": sharded_state_dict(opt, model)}
    dcp.save(sd, checkpoint_id=path)
    ...
    sd = {"model": model.state_dict(), "optim": sharded_state_dict(opt, model)}  # templates
    dcp.load(sd, checkpoint_id=path)
    model.load_state_dict(sd["model"]); load_sharded_state_dict(opt, model, sd["optim"])
"""
from __future__ import annotations

from typing import Any

import torch

from ..masks.sharding import is_dtensor, local_tensor, shard_range
from ..ops import PackedMask
from ..optim import MaskedAdamW

__all__ = ["sharded_state_dict", "load_sharded_state_dict"]

_GROUP_SKIP = ("params",)


def _names(opt: MaskedAdamW, model: torch.nn.Module) -> list:
    """``[(name, param)]`` of the optimizer's parameters, in optimizer order."""
    if not isinstance(opt, MaskedAdamW):
        raise TypeError(f"expected a MaskedAdamW, got {type(opt).__name__}")
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = []
    for p in opt._all_params():
        if id(p) not in by_id:
            raise ValueError("the optimizer holds a parameter that is not in model.named_parameters(): pass the "
                             "model whose parameters the optimizer was built on")
        out.append((by_id[id(p)], p))
    return out


def _state_keys(opt: MaskedAdamW, p: torch.Tensor, group: dict) -> list:
    keys = ["exp_avg", "exp_avg_sq"]
    if group["amsgrad"]:
        keys.append("max_exp_avg_sq")
    if opt.uses_master_weights(p):
        keys.append("master_weight")
    return keys


def _as_global(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``local`` (shaped like the local shard) as a tensor of ``param``'s global shape and placement."""
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def _group_of(opt: MaskedAdamW) -> dict:
    return {p: g for g in opt.param_groups for p in g["params"]}


def _global_steps(named: list, opt: MaskedAdamW) -> dict:
    """Step count of every parameter, the maximum over the ranks of its shard group: a rank whose
    shard has nothing selected never creates state, yet the parameter took the same steps."""
    steps = {}
    by_group: dict = {}
    for name, p in named:
        st = opt.state.get(p, {})
        steps[name] = float(st["step"]) if "step" in st else 0.0
        group = shard_range(p).group if is_dtensor(p) else None
        if group is not None:
            by_group.setdefault(group, []).append(name)
    if by_group:
        import torch.distributed as dist

        for group, names in by_group.items():
            t = torch.tensor([steps[n] for n in names], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            steps.update(zip(names, t.tolist()))
    return steps


@torch.no_grad()
def sharded_state_dict(opt: MaskedAdamW, model: torch.nn.Module) -> dict:
    """The optimizer state as a DCP state dict (also the template to load into).

    Args:
        opt: the optimizer (dense or compact gradients, FSDP2 DTensor parameters or plain ones).
        model: the module its parameters belong to (names the entries).

    Returns:
        ``{"state": {param name: {"step": float32 scalar, "mask": bool[param shape], "exp_avg":
        float32[param shape], "exp_avg_sq": ..., ["max_exp_avg_sq", "master_weight"]}},
        "param_groups": {"0": {hyperparameters}, ...}}``; tensors are DTensors with the parameter's
        placement under FSDP2. Collective under FSDP2 (the step counts): call on every rank.

    Raises:
        ValueError: a parameter has per-element step counts (``set_masks`` added elements after the
            first step): not representable here.
    """
    named = _names(opt, model)
    steps = _global_steps(named, opt)
    group_of = _group_of(opt)
    state = {}
    for name, p in named:
        st = opt.state.get(p, {})
        if "step_offsets" in st:
            raise ValueError(f"parameter {name!r} has per-element step counts (set_masks added elements after "
                             "its first step): the DCP checkpoint cannot hold them; use MaskedAdamW.state_dict()")
        local = local_tensor(p)
        mask = opt.mask_of(p)
        sel = mask.to_bool() if mask is not None else torch.ones(local.shape, dtype=torch.bool, device=local.device)
        entry: dict = {"step": torch.tensor(steps[name], dtype=torch.float32), "mask": _as_global(sel, p)}
        flat_sel = sel.reshape(-1)
        for key in _state_keys(opt, p, group_of[p]):
            dense = torch.zeros(local.shape, dtype=torch.float32, device=local.device)
            if key in st:
                dense.view(-1)[flat_sel] = st[key]
            entry[key] = _as_global(dense, p)
        state[name] = entry
    groups = {}
    for i, g in enumerate(opt.param_groups):
        groups[str(i)] = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in g.items()
                          if k not in _GROUP_SKIP}
    return {"state": state, "param_groups": groups}


@torch.no_grad()
def load_sharded_state_dict(opt: MaskedAdamW, model: torch.nn.Module, state_dict: dict) -> None:
    """Load what DCP read into a :func:`sharded_state_dict` template: masks (this process's piece),
    compact moments / master weights cut to them, step counts and hyperparameters.

    Args:
        opt: the optimizer to restore (built on ``model``, any world size).
        model: the module (names the entries).
        state_dict: the template after ``dcp.load`` filled it.
    """
    named = _names(opt, model)
    if set(state_dict.get("state", {})) != {n for n, _ in named}:
        raise ValueError("state_dict entries do not match the optimizer's parameters: build the template with "
                         "sharded_state_dict(opt, model) on the same model")
    groups = state_dict.get("param_groups", {})
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(groups)} param groups, the optimizer {len(opt.param_groups)}")
    masks, loaded = [], {}
    for name, p in named:
        entry = state_dict["state"][name]
        sel = local_tensor(entry["mask"]).to(torch.bool)
        local = local_tensor(p)
        if sel.shape != local.shape:
            raise ValueError(f"mask of {name!r} loaded with shape {tuple(sel.shape)}, the local parameter is "
                             f"{tuple(local.shape)}")
        if opt.mask_of(p) is None and bool(sel.all()):
            masks.append(None)  # a dense parameter stays dense (same arithmetic, no bit path)
        else:
            masks.append(PackedMask.from_bool(sel.to(local.device)))
        loaded[p] = (entry, sel.reshape(-1).to(local.device))
    opt.state.clear()
    opt.set_masks(masks)  # no state left to remap: sets masks, directories and hooks
    group_of = _group_of(opt)
    for i, g in enumerate(opt.param_groups):
        for k, v in groups[str(i)].items():
            g[k] = tuple(v) if k == "betas" else v
    for name, p in named:
        entry, flat_sel = loaded[p]
        step = float(entry["step"])
        group = group_of[p]
        nnz = int(flat_sel.sum())
        decays_all = group["weight_decay_mode"] == "all" and group["weight_decay"] != 0
        if step == 0 or not (nnz or decays_all):
            continue  # as in MaskedAdamW.step: no state before the first step or for an empty mask
        st: dict[str, Any] = {"step": torch.tensor(step, dtype=torch.float32)}
        for key in _state_keys(opt, p, group):
            st[key] = local_tensor(entry[key]).to(local_tensor(p).device).reshape(-1)[flat_sel].contiguous()
        opt.state[p] = st
