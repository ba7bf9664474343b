"""UnlearnTrainer: a ``transformers.Trainer`` that unlearns with any objective, updating only the
weights a :class:`~wagle_ext.masks.MaskSet` selects (WAGLE), through :class:`~wagle_ext.optim.MaskedAdamW`.

Follows open-unlearning's Trainer-subclass style: ``compute_loss`` dispatches the objective
(``loss = gamma * forget_term + alpha * retain_term``), everything else (gradient accumulation,
bf16 autocast, ``torch.compile``, checkpoints, ``resume_from_checkpoint``, DDP under
``accelerate launch``) is the stock Trainer.

    trainer = UnlearnTrainer(model=model, args=TrainingArguments(...), objective="graddiff",
                             mask=mask_set, train_dataset=ForgetRetainDataset(forget, retain),
                             data_collator=QACollator(tokenizer))
    trainer.train()
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections import defaultdict
from typing import Any, Mapping, Optional, Union

import torch
import transformers
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .._checks import check_grad_mode, check_master_weights, check_weight_decay_mode
from ..lora.fila import FILA_MARK
from ..lora.reference import InitialAdapterReference, adapters_are_zero
from ..masks import MaskSet, format_trainable_report, trainable_report
from ..naming import is_adapter_param
from ..ops import PackedMask
from ..memory import format_memory_report, memory_report
from ..optim import MaskedAdamW
from ..parallel.ddp import register_compact_ddp_hook
from ._hf_shim import GradNormShim, missing_hooks
from .objectives import Objective, get_objective

__all__ = ["UnlearnTrainer", "MASK_FILE"]

logger = logging.getLogger(__name__)

MASK_FILE = "wagle_mask.safetensors"


class _AdapterDisabledReference(nn.Module):
    """The frozen reference of a PEFT model: the same module with its adapters disabled (no extra
    copy of the base weights). Called only under ``torch.no_grad()``."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self._peft = [peft_model]  # a list: not registered as a submodule (no double parameters)

    def forward(self, *args, **kwargs):
        model = self._peft[0]
        with torch.no_grad(), model.disable_adapter():
            return model(*args, **kwargs)


class _DatasetEpochCallback(transformers.TrainerCallback):
    """Calls ``train_dataset.set_epoch(epoch)`` at every epoch start, including the epoch a run
    resumes in, so epoch-dependent pairings (ForgetRetainDataset's retain draw) are a function of
    the epoch alone and ``resume_from_checkpoint`` replays exactly the batches of an uninterrupted
    run. (transformers sets the epoch on its sampler, not on the dataset of a resumed dataloader.)"""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is exactly e at the start of epoch e, and e + k/steps when resuming mid-epoch.
        self.dataset.set_epoch(int(state.epoch + 1e-9))


class _MaskCheckpointCallback(transformers.TrainerCallback):
    """Writes the mask next to every checkpoint (``checkpoint-N/wagle_mask.safetensors``), so that
    ``train(resume_from_checkpoint=...)`` can check it was trained with the same mask. Like the
    optimizer state, it is not written with ``save_only_model``."""

    def __init__(self, mask: MaskSet):
        self.mask = mask

    def on_save(self, args, state, control, **kwargs):
        if args.should_save and not args.save_only_model:
            checkpoint = os.path.join(args.output_dir, f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-"
                                                       f"{state.global_step}")
            if os.path.isdir(checkpoint):
                self.mask.save(os.path.join(checkpoint, MASK_FILE))


def _check_hooks_available(grad_mode, mask, clip_before_mask, args) -> None:
    """Masked clipping and compact gradients need the Trainer hooks of :mod:`._hf_shim`: refuse
    them on a transformers version that lacks them rather than clip the wrong gradient."""
    needed = grad_mode == "compact" or (mask is not None and not clip_before_mask and args.max_grad_norm)
    missing = missing_hooks() if needed else []
    if missing:
        raise RuntimeError(
            f"transformers {transformers.__version__} has no Trainer.{'/'.join(missing)} (private methods this "
            "trainer overrides to clip and log the norm of the masked or compact gradient; see "
            "wagle_ext/unlearn/_hf_shim.py): upgrade transformers, or train with max_grad_norm=0 and grad_mode='dense'")


def _check_grad_mode(grad_mode, step_in_backward, mask, clip_before_mask, weight_decay_mode, args) -> None:
    """Fail before training on grad_mode / step_in_backward settings that cannot work: the
    optimizer's rules (:func:`wagle_ext._checks.check_grad_mode`) and the trainer's own."""
    check_grad_mode(grad_mode, step_in_backward, weight_decay_mode)
    if grad_mode != "compact":
        return
    if mask is None:
        raise ValueError("grad_mode='compact' needs a mask (it keeps only the masked gradient entries)")
    if clip_before_mask:
        raise ValueError("clip_before_mask=True (WAGLE's order: clip the unmasked gradient) needs every dense "
                         "gradient at once: use grad_mode='dense', or clip the masked gradient (the default)")
    if args.fp16:
        raise ValueError("grad_mode='compact' does not support fp16 (GradScaler needs p.grad); use bf16 or fp32")
    # Several processes: under DDP a communication hook compacts before the all-reduce
    # (wagle_ext/parallel/ddp.py); under FSDP2 the hooks see the reduce-scattered shard.
    if args.world_size > 1 and step_in_backward:
        raise ValueError("step_in_backward=True updates before DDP has reduced the gradient: single process only")
    if step_in_backward:
        if args.gradient_accumulation_steps != 1:
            raise ValueError("step_in_backward=True needs gradient_accumulation_steps=1 (each backward is one "
                             f"step), got {args.gradient_accumulation_steps}")
        if args.max_grad_norm:
            raise ValueError("step_in_backward=True cannot clip (the update happens before the total norm is "
                             f"known): set max_grad_norm=0, got {args.max_grad_norm}")


def _check_deepspeed(mask, args) -> None:
    """DeepSpeed (ZeRO >= 1) hands the optimizer flat partitions instead of parameters, so a
    MaskedAdamW client optimizer would update every weight, and an optimizer from the DeepSpeed
    config would ignore the mask: refuse, and name the path that works."""
    if mask is not None and getattr(args, "deepspeed", None):
        raise ValueError("UnlearnTrainer(mask=...) does not run under DeepSpeed: ZeRO replaces the parameters by "
                         "flat partitions, so the mask would be lost. Use DDP or FSDP2 (MaskedAdamW follows the "
                         "shards), or wagle_ext.parallel.mask_gradients_for_zero with DeepSpeed's optimizer "
                         "(README, Multi-GPU)")


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def frozen_reference(model: nn.Module) -> nn.Module:
    """A frozen reference of ``model`` for NPO/DPO/TNPO/KL terms: ``eval()``, ``requires_grad_(False)``,
    same device and dtype. PEFT models reuse their base weights: with adapters disabled when they are
    still zero (PEFT's default init), else (FILA, a loaded adapter) the base plus a frozen copy of the
    starting adapter weights (:class:`~wagle_ext.lora.reference.InitialAdapterReference`; the base
    alone would be FILA's residual, not the model unlearning starts from). Others are deep-copied
    (+1x model memory, as in every reference-based unlearning method)."""
    if _is_peft_model(model):
        return _AdapterDisabledReference(model) if adapters_are_zero(model) else InitialAdapterReference(model)
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


class UnlearnTrainer(GradNormShim, transformers.Trainer):
    """Trainer for masked unlearning.

    Args (beyond ``transformers.Trainer``'s):
        objective: an :class:`Objective` or its registry name (``"graddiff"``, ``"npo"``, ...).
        objective_kwargs: hyperparameters when ``objective`` is a name (``beta``, ``gamma``, ...).
        mask: a :class:`MaskSet` (parameter name -> PackedMask) of the weights to update; None =
            dense unlearning. Checked against the model before training (clear error otherwise).
            Trainable parameters without an entry follow ``mask.missing``: ``"frozen"`` (the
            default) = never updated (bit-identical: an all-zero mask in a group without weight
            decay, whatever ``weight_decay_mode``), ``"dense"`` = updated normally. PEFT adapter
            weights are outside the mask (updated densely). A mask under which nothing would be
            updated is a ``ValueError``.
        ref_model: frozen reference model for objectives that need one; built automatically
            (deep copy; for PEFT models the same weights, see :func:`frozen_reference`) when None and
            ``build_reference``. A PEFT (LoRA) model trains only its adapters, with any objective.
        build_reference: False = never copy the model; an objective that needs a reference then
            requires ``ref_model`` (ValueError otherwise).
        clip_before_mask: True reproduces WAGLE's order (clip the norm of the UNMASKED gradient,
            then mask; WAGLE ``src/unlearn/base.py``); False (default) clips the masked gradient,
            i.e. the norm counts only the weights that move.
        weight_decay_mode: ``MaskedAdamW`` mode: ``"masked"`` (default; frozen weights bit-identical),
            ``"all"`` (decay frozen weights too, as ``grad*=mask`` + torch AdamW does) or ``"none"``.
        grad_mode: ``"dense"`` (default) or ``"compact"``: ``MaskedAdamW`` compacts every gradient
            into a float32 buffer of its selected entries inside backward and frees ``p.grad``, and
            parameters with an all-zero mask get no gradient at all -- the gradient memory drops
            from 4 B/param (fp32) to 4 B per selected weight plus one dense gradient at a time.
            Same updates as dense mode (bit-identical for fp32 weights, with or without gradient
            accumulation and clipping). Needs a ``mask``; under DDP each gradient bucket is compacted
            before its all-reduce (``wagle_ext.parallel.ddp``), under FSDP2 each shard after its
            reduce-scatter; not with ``clip_before_mask=True`` (clipping the unmasked gradient needs
            every dense gradient at once: use dense mode), ``fp16`` (GradScaler) or
            ``weight_decay_mode="all"``.
        step_in_backward: with ``grad_mode="compact"``: apply each parameter's update inside its
            backward hook (LOMO/SIFT); needs ``gradient_accumulation_steps=1`` and no clipping
            (``max_grad_norm=0``). The logged ``grad_norm`` is then absent.
        master_weights: ``MaskedAdamW``'s compact fp32 master copies of the selected elements of
            bf16/fp16 parameters (12 B of state per selected element instead of 8): None (default) =
            on for bf16/fp16 parameters, True/False = force. Without them, AdamW updates below half
            a bf16 ulp are lost (docs/pitfalls.md).
        rounding: how master weights are written back to bf16/fp16: ``"nearest"`` (default, round
            to nearest even) or ``"stochastic"`` (unbiased; seeded by ``args.seed``).

    At the start of training the trainer logs :func:`~wagle_ext.memory.memory_report` (weights,
    gradients, optimizer state, masks, and the dense-AdamW equivalent) and keeps it as
    ``trainer.initial_memory_report``; it also logs (INFO) and keeps as ``trainer.trainable_report``
    the :func:`~wagle_ext.masks.trainable_report` of what the optimizer will update (total, updated,
    frozen, density, per category). ``trainer.trainable_report`` is first set at construction.

    ``args.remove_unused_columns`` is forced to False (batches are dicts of sub-batches).
    """

    def __init__(self, model: Optional[nn.Module] = None, args: Optional[transformers.TrainingArguments] = None,
                 *, objective: Union[str, Objective] = "graddiff", objective_kwargs: Optional[Mapping[str, Any]] = None,
                 mask: Optional[MaskSet] = None, ref_model: Optional[nn.Module] = None,
                 clip_before_mask: bool = False, weight_decay_mode: str = "masked",
                 grad_mode: str = "dense", step_in_backward: bool = False,
                 master_weights: Optional[bool] = None, rounding: str = "nearest",
                 build_reference: bool = True, **kwargs):
        if model is None:
            raise ValueError("UnlearnTrainer needs a model")
        # Fail fast, before any training: objective, mask/model fit, data fields, decay mode.
        if isinstance(objective, str):
            objective = get_objective(objective, **dict(objective_kwargs or {}))
        elif objective_kwargs:
            raise ValueError("objective_kwargs is only used when objective is given by name")
        if not isinstance(objective, Objective):
            raise TypeError(f"objective must be an Objective or a name, got {type(objective).__name__}")
        if mask is not None:
            if not isinstance(mask, MaskSet):
                raise TypeError(f"mask must be a wagle_ext.MaskSet, got {type(mask).__name__}")
            mask.check_compatible(model)
        report = trainable_report(model, mask)
        if mask is not None and report["updated"] == 0:
            raise ValueError(
                f"the mask updates nothing: it selects 0 of {mask.numel} weights in {len(mask)} tensors and "
                f"the other {report['frozen_missing']['numel']} trainable weights are frozen "
                f"(missing={mask.missing!r}); rebuild it with a larger ratio (or set missing='dense' to "
                "train the parameters it does not cover)")
        check_weight_decay_mode(weight_decay_mode)
        train_dataset = kwargs.get("train_dataset")
        if train_dataset is not None and len(train_dataset) > 0:
            first = train_dataset[0]
            missing = [k for k in objective.batch_keys if k not in first]
            if missing:
                raise ValueError(
                    f"objective {objective.name!r} needs {list(objective.batch_keys)} in every example, the "
                    f"dataset lacks {missing} (e.g. ForgetRetainDataset(..., refusal=True) for PO)")
        if args is None:
            raise ValueError("UnlearnTrainer needs TrainingArguments (args=...)")
        _check_grad_mode(grad_mode, step_in_backward, mask, clip_before_mask, weight_decay_mode, args)
        _check_deepspeed(mask, args)
        _check_hooks_available(grad_mode, mask, clip_before_mask, args)
        check_master_weights(master_weights, rounding, args.seed)
        args.remove_unused_columns = False

        self.objective = objective
        self.mask = mask
        self.clip_before_mask = bool(clip_before_mask)
        self.weight_decay_mode = weight_decay_mode
        self.grad_mode = grad_mode
        self.step_in_backward = bool(step_in_backward)
        self.master_weights = master_weights
        self.rounding = rounding
        self.initial_memory_report: Optional[dict] = None
        self.trainable_report: dict = report
        if objective.needs_reference and ref_model is None:
            if not build_reference:
                raise ValueError(f"objective {objective.name!r} needs a reference model: pass ref_model=... "
                                 "or build_reference=True")
            ref_model = frozen_reference(model)
        self.ref_model = ref_model if objective.needs_reference else None
        super().__init__(model=model, args=args, **kwargs)
        if self.train_dataset is not None and hasattr(self.train_dataset, "set_epoch"):
            self.add_callback(_DatasetEpochCallback(self.train_dataset))
        if mask is not None:
            self.add_callback(_MaskCheckpointCallback(mask))
        # Objectives return per-micro-batch means: let Trainer divide by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self._objective_logs: dict = defaultdict(float)
        self._objective_log_count = 0
        self._param_masks: Optional[dict] = None

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        inputs.pop("index", None)
        ref = self.ref_model
        if ref is not None and not isinstance(ref, (_AdapterDisabledReference, InitialAdapterReference)):
            dev = next(model.parameters()).device
            if next(ref.parameters()).device != dev:
                ref.to(dev)
        per_term = self.grad_mode == "compact" and model.training and torch.is_grad_enabled()
        if per_term:
            self._compact_under_ddp(model)
        loss, logs = self.objective(model, inputs, ref_model=ref,
                                    backward=self._term_backward() if per_term else None)
        if per_term:
            loss = loss.detach().requires_grad_(True)
        for k, v in logs.items():
            self._objective_logs[k] += float(v)
        self._objective_log_count += 1
        return (loss, None) if return_outputs else loss

    def _term_backward(self):
        """Backward of each objective term as soon as it is computed (``Objective(backward=)``), for
        compact mode: a single backward through the forget and the retain passes would hold one
        dense gradient per parameter until both branches reach it. Same gradients; Trainer's own
        backward then runs on a detached leaf (a no-op). Scaled as Trainer scales the loss
        (``loss / GA``). With step_in_backward, only the last term's backward updates."""
        ga = self.current_gradient_accumulation_steps
        n_terms = 1 + (self.objective.retain != "none")
        calls = [0]
        opt = self._masked_optimizer()

        def backward(term):
            calls[0] += 1
            hold = self.step_in_backward and calls[0] < n_terms
            with opt.accumulate_only() if hold else contextlib.nullcontext():
                self.accelerator.backward(term / ga)

        return backward

    def _compact_under_ddp(self, model) -> None:
        """Compact mode under DDP: compact each gradient bucket before its all-reduce (once, at the
        first training step, when accelerate has wrapped the model)."""
        if getattr(self, "_ddp_hook_model", None) is model or not isinstance(model, DistributedDataParallel):
            return
        register_compact_ddp_hook(model, self._masked_optimizer())
        self._ddp_hook_model = model

    def _masked_optimizer(self):
        opt = self.optimizer
        while not hasattr(opt, "compact_grad") and hasattr(opt, "optimizer"):
            opt = opt.optimizer  # accelerate's AcceleratedOptimizer wraps ours
        return opt

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._objective_log_count and "loss" in logs:
            for k, v in self._objective_logs.items():
                logs[f"objective/{k}"] = v / self._objective_log_count
            self._objective_logs.clear()
            self._objective_log_count = 0
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        if self.mask is None:
            opt = super().create_optimizer(model) if model is not None else super().create_optimizer()
            self._log_trainable_report(self.model if model is None else model)
            self._log_memory_report(self.model if model is None else model, opt)
            return opt
        opt_model = self.model if model is None else model
        self._check_masks_identical_across_ranks()
        masks = self._model_masks(opt_model)
        frozen_missing = self.mask.missing == "frozen"
        # transformers' grouping: no weight decay on biases and norm weights. Parameters that the
        # mask does not cover and freezes get an all-zero mask in a group without weight decay, so
        # they stay bit-identical even with weight_decay_mode="all" (and get no gradient in compact mode).
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = {True: [], False: [], "frozen": []}
        for name, p in opt_model.named_parameters():
            if not p.requires_grad:
                continue
            if name not in masks and frozen_missing and not is_adapter_param(name):
                groups["frozen"].append((name, p))
            else:
                groups[name in decay].append((name, p))
        param_groups, aligned = [], []
        for key, named in groups.items():
            if named:
                param_groups.append({"params": [p for _, p in named],
                                     "weight_decay": self.args.weight_decay if key is True else 0.0})
                aligned += [masks.get(n) if key != "frozen" else PackedMask.full(p.shape, False, device=p.device)
                            for n, p in named]
        self.optimizer = MaskedAdamW(
            param_groups, masks=aligned, lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
            weight_decay=self.args.weight_decay, weight_decay_mode=self.weight_decay_mode,
            grad_mode=self.grad_mode, step_in_backward=self.step_in_backward,
            master_weights=self.master_weights, rounding=self.rounding, seed=self.args.seed)
        self._log_trainable_report(opt_model)
        self._log_memory_report(opt_model, self.optimizer)
        return self.optimizer

    def _log_trainable_report(self, model) -> None:
        self.trainable_report = trainable_report(model, self.mask)
        logger.info("wagle %s", format_trainable_report(self.trainable_report))

    def _log_memory_report(self, model, optimizer) -> None:
        self.initial_memory_report = memory_report(model, optimizer)
        logger.info("wagle memory at start (grad_mode=%s): %s", self.grad_mode,
                    format_memory_report(self.initial_memory_report))

    def _check_masks_identical_across_ranks(self) -> None:
        """Under DDP every rank must update the same weights: compare a digest of the mask bits."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        # MaskSet.checksum covers names, shapes, counts, missing and bits.
        digest = torch.tensor(list(bytes.fromhex(self.mask.checksum().split(":", 1)[1])[:8]), dtype=torch.int64)
        gathered = [torch.zeros_like(digest) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, digest)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise ValueError("the mask differs across ranks: every process must load the same MaskSet")

    def set_mask(self, mask: MaskSet) -> None:
        """Replace the mask during training (e.g. re-scored every N steps,
        :class:`~wagle_ext.unlearn.rescore.RescoreCallback`): the optimizer's masks are swapped in
        place (:meth:`MaskedAdamW.set_masks`: weights selected before and after keep their moments,
        newly selected ones start from zero moments, dropped ones freeze at their current value).
        The new mask must cover the same tensors with the same ``missing`` mode (the optimizer's
        parameter groups stay as built). Dense gradients only: in compact mode the hooks' buffers
        are laid out by the old mask."""
        if not isinstance(mask, MaskSet):
            raise TypeError(f"mask must be a wagle_ext.MaskSet, got {type(mask).__name__}")
        if self.mask is None:
            raise ValueError("set_mask: this trainer has no mask to replace (it was built for dense unlearning)")
        if mask.names() != self.mask.names() or mask.missing != self.mask.missing:
            raise ValueError("set_mask: the new mask must cover the same tensors with the same missing mode")
        if self.grad_mode == "compact":
            raise ValueError("set_mask needs grad_mode='dense' (compact gradient buffers follow the old mask)")
        mask.check_compatible(self.model)
        self.mask = mask
        self._param_masks = None
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, _MaskCheckpointCallback):
                cb.mask = mask
        if self.optimizer is None:
            return
        opt = self._masked_optimizer()
        named = {id(p): n for n, p in self.model.named_parameters()}
        new = self._model_masks(self.model)
        aligned = []
        for group in opt.param_groups:
            for p in group["params"]:
                name = named.get(id(p))
                aligned.append(new[name] if name in new else opt.mask_of(p))
        opt.set_masks(aligned)
        self.trainable_report = trainable_report(self.model, mask)

    # ------------------------------------------------------------------ clipping
    def _model_masks(self, model) -> dict:
        """{model parameter name: PackedMask}, resolved once."""
        if self._param_masks is None:
            self._param_masks = dict(self.mask.for_model(model))
        return self._param_masks

    def clip_grad_norm(self, model, fallback):
        """Clip the pending gradients to ``args.max_grad_norm``; returns the norm before clipping.
        With a mask (and not ``clip_before_mask``): the norm of the gradient restricted to the
        selected weights (frozen entries never move, so they should not shrink the step), then the
        usual ``clip_grad_norm_`` scaling; the same in dense and compact mode
        (:meth:`MaskedAdamW.clip_grad_norm_`). Otherwise ``fallback`` (transformers' clipping)."""
        if self.mask is None or self.clip_before_mask:
            return fallback(model)
        return self._masked_optimizer().clip_grad_norm_(self.args.max_grad_norm)

    def logged_grad_norm(self, model, grad_norm, fallback):
        """The gradient norm transformers logs (``grad_norm`` when clipping computed it): in compact
        mode the compact gradients' norm (``p.grad`` is None), None with ``step_in_backward`` (the
        gradients were consumed inside backward)."""
        if self.grad_mode == "compact" and grad_norm is None:
            if self.step_in_backward:
                return None
            grad_norm = self._masked_optimizer().grad_norm()
        return fallback(model, grad_norm=grad_norm)

    # ------------------------------------------------------------------ checkpoints
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """``transformers.Trainer.save_model`` (a PEFT model saves its adapter only). When FILA replaced
        the base weights of the PEFT model by residuals, the final save (not the checkpoints) also
        writes those base weights to ``<output_dir>/base``, since the adapter is only right on them
        (docs/lora.md, "Export"); ``wagle_ext.lora.load_adapter_with_base(output_dir)`` reloads the pair.
        For a single plain model folder use ``wagle_ext.lora.save_merged``."""
        super().save_model(output_dir, _internal_call=_internal_call)
        model = self.model
        if not _internal_call and _is_peft_model(model) and getattr(model, FILA_MARK, None) and self.args.should_save:
            from ..lora.export import save_base

            save_base(model, os.path.join(output_dir or self.args.output_dir, "base"))

    def train(self, resume_from_checkpoint: Optional[Union[str, bool]] = None, *args, **kwargs):
        """``transformers.Trainer.train``; resuming with a mask first checks that the checkpoint was
        trained with the same mask (its ``wagle_mask.safetensors``)."""
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False and self.mask is not None:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir)
            if checkpoint is not None:
                path = os.path.join(checkpoint, MASK_FILE)
                if os.path.exists(path) and MaskSet.load(path) != self.mask:
                    raise ValueError(f"resuming from {checkpoint} with a different mask than the one it was trained "
                                     "with; load that checkpoint's mask (MaskSet.load) to continue exactly")
        return super().train(resume_from_checkpoint, *args, **kwargs)
