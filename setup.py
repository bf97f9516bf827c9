"""Packaging: `kernels/` (repo root) installs as `peft_fast.kernels`, `csrc/` as `peft_fast.csrc`,
`bench/` (the benchmark suites) as `peft_fast_bench`.

A top-level `kernels` module would shadow Hugging Face's own `kernels` package, which
transformers probes for, so the folder is mapped under our namespace here. csrc/ ships as
package data so an installed peft_fast can JIT-build its CUDA kernels (peft_fast/ops/cuda/build.py).
bench/ stays at the repo root beside its results and notes; it installs as its own top-level
package so `peft-fast bench` works from an install while the library never imports it
(its modules only; results/, NOTES.md and the scripts are not shipped).

The CUDA extension `peft_fast._C` is built here only when torch is a CUDA build, nvcc is
found and PEFT_FAST_BUILD_CUDA is not "0" (set PEFT_FAST_BUILD_CUDA=1 to insist: a missing
toolkit is then an error). Otherwise it is skipped and built on first use instead; CPU
machines (CI) never try. Needs `--no-build-isolation` so the installed torch is the one seen.
"""

import os

from setuptools import find_packages, setup

packages = find_packages(include=["peft_fast", "peft_fast.*"])
kwargs = {}


def _cuda_extension():
    """(ext_modules, cmdclass) for peft_fast._C, or None (with the reason printed) to skip it."""
    wanted = os.environ.get("PEFT_FAST_BUILD_CUDA", "auto")
    if wanted == "0":
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as e:  # torch absent from the build environment (build isolation)
        reason = f"torch is not importable here ({type(e).__name__})"
    else:
        if torch.version.cuda is None:
            reason = "torch is a CPU build"
        elif CUDA_HOME is None:
            reason = "no CUDA toolkit (nvcc) found"
        else:
            here = os.path.dirname(os.path.abspath(__file__))
            srcs = sorted(f"csrc/{f}" for f in os.listdir(os.path.join(here, "csrc")) if f.endswith((".cu", ".cpp")))
            ext = CUDAExtension(
                "peft_fast._C",
                srcs,
                include_dirs=[os.path.join(here, "csrc")],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
            )
            return [ext], {"build_ext": BuildExtension}
    if wanted == "1":
        raise RuntimeError(f"PEFT_FAST_BUILD_CUDA=1 but peft_fast._C cannot be built: {reason}")
    print(f"peft_fast: not building the CUDA extension ({reason}); it is JIT-built on first use")
    return None


_ext = _cuda_extension()
if _ext is not None:
    kwargs["ext_modules"], kwargs["cmdclass"] = _ext

setup(
    packages=packages + ["peft_fast.kernels", "peft_fast.data", "peft_fast.csrc", "peft_fast_bench"],
    package_dir={"peft_fast.kernels": "kernels", "peft_fast.csrc": "csrc", "peft_fast_bench": "bench"},
    package_data={
        "peft_fast": ["data/*.jsonl", "ops/backend_table.json"],
        "peft_fast.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp"],
    },
    include_package_data=True,
    **kwargs,
)
