"""Old module paths, kept importable after the move to layered sub-packages.

``import wagle_ext.trainer`` (and the other names in :data:`MOVED`) gives the module at its new
path -- the same module object, so attributes, monkeypatching and ``isinstance`` all agree. One
meta-path finder instead of one stub file per old name, so the folder tree shows only the layers.
Installed by ``wagle_ext/__init__.py``; imports nothing from ``wagle_ext`` until an old name is
imported.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["MOVED", "install"]

#: old module path -> new module path
MOVED = {
    "wagle_ext.packed_mask": "wagle_ext.ops.packed_mask",
    "wagle_ext.data": "wagle_ext.unlearn.data",
    "wagle_ext.objectives": "wagle_ext.unlearn.objectives",
    "wagle_ext.trainer": "wagle_ext.unlearn.trainer",
    "wagle_ext.evaluation": "wagle_ext.eval",
    "wagle_ext.tofu_data": "wagle_ext.eval.tofu_data",
    "wagle_ext.cli": "wagle_ext.app.cli",
    "wagle_ext.config": "wagle_ext.app.config",
    "wagle_ext.embedded_benchmark": "wagle_ext.app.embedded_benchmark",
    "wagle_ext.fictitious_authors": "wagle_ext.app.fictitious_authors",
}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names of :data:`MOVED` and loads them as the module at the new path."""

    def __init__(self) -> None:
        self._own: dict = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        # The import system is about to stamp the alias's name and spec on the module: keep its own.
        self._own[spec.name] = {k: module.__dict__[k] for k in _OWN_ATTRS if k in module.__dict__}
        return module

    def exec_module(self, module):
        module.__dict__.update(self._own.pop(module.__spec__.name, {}))  # __spec__: the alias's, here

    def get_code(self, fullname):
        # ``python -m wagle_ext.cli`` (runpy asks the loader for code): run the new module as __main__.
        return compile(f"import runpy\nrunpy.run_module({MOVED[fullname]!r}, run_name='__main__', alter_sys=True)\n",
                       f"<{fullname} -> {MOVED[fullname]}>", "exec")


_OWN_ATTRS = ("__name__", "__spec__", "__loader__", "__package__", "__file__", "__path__", "__cached__")


def install() -> None:
    """Put the alias finder first on ``sys.meta_path`` (once). First, because it answers only for
    the old names, which no file provides any more -- a finder further down (e.g. an editable
    install of another checkout) could otherwise serve a stale copy."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
