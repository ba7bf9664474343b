"""Build script for wagle_ext._C (C++ CPU ops; CUDA ops when a CUDA torch and nvcc are present).

Environment variables
---------------------
WAGLE_NO_EXT=1        pure-Python install: no compiler needed, the reference ops are used.
WAGLE_CUDA=auto|0|1   build csrc/cuda/* (auto: only with a CUDA build of torch and CUDA_HOME).
DEBUG=1               -O0 -g instead of -O3 -g0.
WAGLE_SANITIZE=1      ASan + UBSan build of the CPU ops (-fsanitize=address,undefined -O1 -g);
                      use it through `make sanitize` / tools/sanitize.sh (needs LD_PRELOAD).
MAX_JOBS              parallel compile jobs (torch.utils.cpp_extension convention).

Build with ``pip install --no-build-isolation .`` so the extension compiles against the torch
that is already installed.
"""
import glob
import os
import re
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _want_cuda(torch_mod, cuda_home):
    mode = os.environ.get("WAGLE_CUDA", "auto").lower()
    if mode in ("0", "false", "off", "no"):
        return False
    available = torch_mod.version.cuda is not None and cuda_home is not None
    if mode in ("1", "true", "on", "yes"):
        if not available:
            raise RuntimeError(
                "WAGLE_CUDA=1 but no CUDA build of torch / CUDA_HOME was found "
                f"(torch.version.cuda={torch_mod.version.cuda!r}, CUDA_HOME={cuda_home!r})")
        return True
    return available


# nvcc options that break the CUDA kernels' bit-exactness with the CPU ops (docs/pitfalls.md K20):
# approximate division / square root, and flushing denormals to zero, which no intrinsic undoes
# (-ftz=true turns even __fmul_rn into mul.rn.ftz.f32). nvcc 13 defines no macro for them, so the
# sources cannot refuse them (device_common.cuh does where __USE_FAST_MATH__ is defined).
_INEXACT_NVCC_FLAGS = re.compile(
    r"(?:^|\s)(--?use[_-]fast[_-]math\b|--?ftz(?:=|\s+)true\b|--?prec[_-](?:div|sqrt)(?:=|\s+)false\b)")


def check_nvcc_flags(flags: str) -> None:
    """Raise if NVCC_FLAGS would make the CUDA kernels inexact (see _INEXACT_NVCC_FLAGS)."""
    m = _INEXACT_NVCC_FLAGS.search(flags)
    if m:
        raise RuntimeError(f"NVCC_FLAGS contains {m.group(1).strip()!r}: the CUDA kernels must use IEEE division "
                           "and square root and keep denormals (scores, radix keys and AdamW are compared bit "
                           "for bit with the CPU ops); remove it")


def get_extensions():
    if os.environ.get("WAGLE_NO_EXT", "0") == "1":
        print("wagle-ext: WAGLE_NO_EXT=1, building a pure-Python package (reference ops only)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("wagle-ext: torch is not importable at build time; building without the C++ "
              "extension. Install torch first and build with --no-build-isolation.", file=sys.stderr)
        return [], {}

    debug = os.environ.get("DEBUG", "0") == "1"
    sanitize = os.environ.get("WAGLE_SANITIZE", "0") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0", "-DNDEBUG"]
    if sanitize:  # tools/sanitize.sh. -fno-wrapv undoes Python's CFLAGS -fwrapv, which would
        # define signed overflow and so switch off UBSan's signed-integer-overflow check.
        cxx = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-wrapv"]
    # OpenMP drives at::parallel_for; libgomp is the same soname torch itself loads.
    # No -march=native: SIMD is chosen at run time (csrc/cpu/cpu_dispatch.h).
    cxx += ["-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    link = ["-fopenmp"]
    if sanitize:
        link += ["-fsanitize=address,undefined", "-g"]
    elif debug:
        link.append("-g")
    else:
        link.append("-Wl,--strip-debug")

    sources = _rel([os.path.join(ROOT, "csrc", "ops.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    ext_cls = CppExtension
    extra = {"cxx": cxx}
    if _want_cuda(torch, CUDA_HOME):
        ext_cls = CUDAExtension
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) +
                        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
        define_macros.append(("WAGLE_WITH_CUDA", None))
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] if not debug else ["-O0", "-g", "-G"]
        check_nvcc_flags(os.environ.get("NVCC_FLAGS", ""))
        nvcc += os.environ.get("NVCC_FLAGS", "").split()
        extra["nvcc"] = nvcc
        print("wagle-ext: building CUDA kernels")
    ext = ext_cls(
        name="wagle_ext._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link,
        py_limited_api=True,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = get_extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
