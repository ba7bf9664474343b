"""The package's shape: layers, import direction, file sizes.

Layer map of ``wagle_ext`` (lowest first). A module may import modules of its own layer (without
cycles) and of the layers below it, never above; every import counts, lazy ones inside functions
included. The folder tree reads as the data flow model + data -> gradients -> scores -> mask ->
optimizer -> trainer -> evaluation (docs/layers.md has the same table).

====  ==============================================  ==========================================
rank  package / module                                responsibility
====  ==============================================  ==========================================
0     ``_version``, ``_checks``, ``naming``,          foundation: the version, shared validation
      ``_util``, ``plotting``, ``_compat``            (one source per rule), parameter names and
                                                      fingerprints, loop plumbing, figures, the
                                                      old-module-path aliases; no wagle imports
1     ``kernels`` (``reference``, ``triton``), ``_C`` the kernels of each back end
2     ``ops``                                         the one door to the kernels: typed wrappers,
                                                      fakes, back-end choice, bit arrays and their
                                                      value type PackedMask, radix select, AdamW
                                                      argument checks
3     ``attribution``                                 model + data -> gradients -> scores
4     ``masks``                                       named scores -> MaskSet (build_mask, per-row
                                                      selection, distributed gather, artifact I/O,
                                                      stats)
5     ``optim``, ``parallel``                         MaskedAdamW (masks -> compact updates);
                                                      FSDP2 checkpoints, DDP compact hook,
                                                      DeepSpeed configs
5     ``lora``                                        LoRA adapters: Fisher importances, FILA,
                                                      attribution-guided placement, export
6     ``memory``                                      memory accounting of model + optimizer
7     ``unlearn``                                     data, objectives/losses, trainer (+ the one
                                                      transformers-internals shim)
8     ``eval``                                        TOFU metrics, protocol and data loaders
9     ``app``                                         cli, job configs, embedded benchmark,
                                                      fictitious authors
10    ``wagle_ext`` (``__init__``)                    the public face ``import wagle_ext as W``
====  ==============================================  ==========================================
"""
from __future__ import annotations

import ast
import os

import pytest

PKG = "wagle_ext"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PKG)

LAYERS = [
    ("wagle_ext._version", 0), ("wagle_ext._checks", 0), ("wagle_ext.naming", 0), ("wagle_ext._util", 0),
    ("wagle_ext.plotting", 0), ("wagle_ext._compat", 0),
    ("wagle_ext.kernels", 1), ("wagle_ext._C", 1),
    ("wagle_ext.ops", 2),
    ("wagle_ext.attribution", 3),
    ("wagle_ext.masks", 4),
    ("wagle_ext.optim", 5), ("wagle_ext.parallel", 5), ("wagle_ext.lora", 5),
    ("wagle_ext.memory", 6),
    ("wagle_ext.unlearn", 7),
    ("wagle_ext.eval", 8),
    ("wagle_ext.app", 9),
    ("wagle_ext", 10),
]
MAX_LINES = 500
LONG_FILE_MARK = "Long file:"  # a module over MAX_LINES says why in its docstring, after this mark


def _modules() -> dict:
    """module name -> (path, is_package) for every .py file of the package."""
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(d, f)
            rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
            is_pkg = rel[-1] == "__init__"
            if is_pkg:
                rel = rel[:-1]
            out[".".join(rel)] = (path, is_pkg)
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[best]


def _imports(module: str) -> set:
    """wagle_ext modules ``module`` imports (anywhere in its file, lazy imports included)."""
    path, is_pkg = MODULES[module]
    tree = ast.parse(open(path).read(), path)
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[: len(base) - node.level + 1]
                mod = ".".join(pkg + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule when there is one.
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES or f"{mod}.{a.name}" == "wagle_ext._C"
                       else mod for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == PKG or t.startswith(PKG + "."))
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        assert _layer(m) is not None, m


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_imports(module):
    mine = _layer(module)
    upward = sorted(t for t in GRAPH[module] if _layer(t) > mine)
    assert not upward, (f"{module} (layer {mine}) imports {[(t, _layer(t)) for t in upward]} from layers above "
                        "its own; move the shared code down or the caller up (tests/test_architecture.py)")


def test_no_import_cycles():
    """Depth-first search for a back edge in the module import graph."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {m: WHITE for m in MODULES}
    stack: list = []

    def visit(m):
        colour[m] = GREY
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if t not in colour:
                continue  # e.g. the compiled wagle_ext._C
            if colour[t] == GREY:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if colour[t] == WHITE:
                visit(t)
        stack.pop()
        colour[m] = BLACK

    for m in sorted(MODULES):
        if colour[m] == WHITE:
            visit(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_file_length(module):
    path, _ = MODULES[module]
    source = open(path).read()
    n = source.count("\n")
    if n > MAX_LINES:
        doc = ast.get_docstring(ast.parse(source)) or ""
        assert LONG_FILE_MARK in doc, (f"{os.path.relpath(path)} has {n} lines (> {MAX_LINES}): split it, or say "
                                       f"why not in its docstring after {LONG_FILE_MARK!r}")


def test_only_ops_touch_torch_ops_wagle():
    """"The one door": outside ``wagle_ext.ops`` (and the kernels it dispatches to) no module calls
    ``torch.ops.wagle`` directly."""
    offenders = []
    for m, (path, _) in MODULES.items():
        if _layer(m) <= _layer("wagle_ext.ops"):
            continue
        if "torch.ops.wagle" in open(path).read():
            offenders.append(m)
    assert not offenders


def test_old_module_paths_alias_the_new_modules():
    import importlib

    from wagle_ext._compat import MOVED

    for old, new in MOVED.items():
        if old in ("wagle_ext.trainer",):  # imports transformers: covered by the trainer tests
            continue
        assert importlib.import_module(old) is importlib.import_module(new), old
