"""Build megamoe and its optional C++/CUDA extensions.

Two extension modules, one concept each:
  megamoe._data_helpers  csrc/data/*.cpp     dataset index builders (NumPy in/out, GIL released)
  megamoe._permute       csrc/permute/*.cpp  token permutation ops (torch tensors); CUDA kernels
                          + csrc/permute/*.cu  are compiled in only when a CUDA toolkit and a CUDA
                                               build of torch are both present.
Every extension is optional: if a build fails the package still installs and runs through its
pure PyTorch / NumPy fallbacks (``megamoe.ops.backend()`` says which is active, and every
training run logs it at start). On GPU machines install with MEGAMOE_REQUIRE_EXT=1, which turns
a failed build into an error instead of a silent fallback to the slower torch path.
Install with ``pip install --no-build-isolation -e .`` so the build sees the torch you have.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # no torch at build time: pure-Python install
        print("megamoe: torch not importable at build time; skipping C++ extensions", file=sys.stderr)
        return [], {}
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++20 for
    # torch 2.13); forcing an older one breaks the build against newer torch.
    extra_cxx = ["-O3"]
    exts = []
    data_src = _sources("csrc/data/*.cpp")
    if data_src:
        exts.append(cpp_extension.CppExtension(
            "megamoe._data_helpers", data_src, extra_compile_args={"cxx": extra_cxx}))
    permute_src = _sources("csrc/permute/*.cpp")
    cuda_src = _sources("csrc/permute/*.cu")
    with_cuda = (bool(cuda_src) and torch.version.cuda is not None
                 and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("MEGAMOE_NO_CUDA", "0") != "1")
    if permute_src:
        if with_cuda:
            exts.append(cpp_extension.CUDAExtension(
                "megamoe._permute", permute_src + cuda_src,
                define_macros=[("MEGAMOE_WITH_CUDA", "1")],
                extra_compile_args={"cxx": extra_cxx, "nvcc": ["-O3", "--use_fast_math"]}))
        else:
            exts.append(cpp_extension.CppExtension(
                "megamoe._permute", permute_src, extra_compile_args={"cxx": extra_cxx}))
    return exts, {"build_ext": _optional_build_ext(cpp_extension.BuildExtension)}


def _optional_build_ext(base):
    class OptionalBuildExt(base):
        """Build each extension; on failure warn and go on (fallbacks cover it)."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001 - any compiler failure
                if os.environ.get("MEGAMOE_REQUIRE_EXT", "0") == "1":
                    raise
                print(f"megamoe: WARNING: could not build {ext.name} ({err}); "
                      "using the PyTorch/NumPy fallback", file=sys.stderr)

    return OptionalBuildExt


ext_modules, cmdclass = _extensions()

setup(
    name="megamoe",
    version="0.1.0",
    description="Mixture-of-Experts LM training: TP/SP, PP, DP (ZeRO-1) and EP around a grouped-GEMM dropless MoE",
    packages=find_packages(include=["megamoe", "megamoe.*"]),
    python_requires=">=3.10",
    # orjson: ~2x faster JSON parsing in preprocessing (the stdlib json is the fallback).
    install_requires=["torch>=2.4", "numpy", "pyyaml", "tqdm", "tokenizers", "orjson"],
    extras_require={
        # tensorboard: the TensorBoard sink's tests run instead of skipping (W&B stays optional)
        "test": ["pytest", "safetensors", "transformers", "matplotlib", "tensorboard"],
        "hf": ["safetensors", "transformers"],
        "plots": ["matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["megamoe=megamoe.cli:main"]},
)
