"""The only code in ``wagle_ext`` that touches private ``transformers.Trainer`` methods.

:class:`UnlearnTrainer` uses public extension points wherever transformers has one: ``compute_loss``,
``create_optimizer``, ``log``, ``train`` (the resume check of the mask) and callbacks (the mask file
in every checkpoint, the dataset epoch). One thing has no public hook: the training loop clips the
gradients and computes the logged gradient norm itself, over ``model.parameters()``, which is wrong
for a mask (the norm must count only the weights that move) and for compact gradients (``p.grad``
is None). Transformers routes both through two private methods, ``Trainer._clip_grad_norm(model)``
and ``Trainer._get_grad_norm(model, grad_norm=None)``; :class:`GradNormShim` overrides exactly
those two and forwards to the public-named hooks of the subclass.

Supported transformers: the versions whose ``Trainer`` has both methods with these signatures and
calls them from its training loop (``tests/test_trainer_shim.py`` checks the installed version;
``missing_hooks()`` says what an unsupported one lacks, and the trainer refuses to run settings that
need the hooks on such a version instead of silently clipping the wrong gradient).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

__all__ = ["GradNormShim", "HOOKED", "missing_hooks"]

#: private ``transformers.Trainer`` method -> leading parameters the shim relies on
HOOKED = {
    "_clip_grad_norm": ("self", "model"),
    "_get_grad_norm": ("self", "model", "grad_norm"),
}


def missing_hooks(trainer_cls: Optional[type] = None) -> list:
    """The :data:`HOOKED` methods that ``trainer_cls`` (default ``transformers.Trainer``) lacks or
    whose signature changed; ``[]`` on a supported version."""
    if trainer_cls is None:
        import transformers

        trainer_cls = transformers.Trainer
    out = []
    for name, params in HOOKED.items():
        fn = getattr(trainer_cls, name, None)
        if fn is None or tuple(inspect.signature(fn).parameters)[:len(params)] != params:
            out.append(name)
    return out


class GradNormShim:
    """Mixin placed before ``transformers.Trainer`` in the bases of a trainer that defines
    ``clip_grad_norm(model, fallback)`` and ``logged_grad_norm(model, grad_norm, fallback)``
    (``fallback`` = transformers' own implementation, for the cases the subclass leaves alone)."""

    clip_grad_norm: Callable[..., Any]
    logged_grad_norm: Callable[..., Any]

    def _clip_grad_norm(self, model):
        return self.clip_grad_norm(model, fallback=super()._clip_grad_norm)  # type: ignore[misc]

    def _get_grad_norm(self, model, grad_norm=None):
        return self.logged_grad_norm(model, grad_norm, fallback=super()._get_grad_norm)  # type: ignore[misc]
