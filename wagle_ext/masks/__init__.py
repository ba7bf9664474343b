"""Weight masks: :class:`PackedMask` (1 bit per weight), exact top-k selection over named score
tensors (:func:`build_mask`), and the :class:`MaskSet` artifact.

A mask marks the weights **selected for update** (WAGLE convention: ``ratio`` is the fraction of
weights that train, i.e. density = 1 - sparsity; WAGLE ``generate_mask.py::get_mask``, README
"tofu_0.8.pt ... 80% weights are selected"). Masks are keyed by parameter name and stored one bit
per weight, in safetensors files with provenance metadata.

Modules: ``select`` (build_mask, per-row selection), ``distributed``
(partitioning over ranks, gathering), ``sharding`` (the piece of a whole-parameter mask that an
FSDP2 rank holds), ``maskset`` (MaskSet, I/O, statistics).

Layering: the masks know about named tensors and ``nn.Module.named_parameters()`` only; they use the
ops (selection, :class:`PackedMask`) and :mod:`wagle_ext.naming`, and never import the attribution
(gradients/scores), optimizer or trainer code.
"""
from ..naming import model_fingerprint, normalize_param_name
from .distributed import partition_names
from .maskset import MASK_FORMAT, MASK_FORMAT_VERSION, MISSING_MODES, MaskSet, format_trainable_report, trainable_report
from ..ops import PackedMask, select_topk_mask
from .select import build_mask, select_per_row
from .sharding import shard_masks

__all__ = [
    "MaskSet",
    "PackedMask",
    "build_mask",
    "model_fingerprint",
    "normalize_param_name",
    "partition_names",
    "select_per_row",
    "shard_masks",
    "select_topk_mask",
    "MASK_FORMAT",
    "MASK_FORMAT_VERSION",
    "MISSING_MODES",
    "format_trainable_report",
    "trainable_report",
]
