"""Finding, building and loading `peft_fast._C`, the CUDA C++ kernels in csrc/.

Three ways to the library, tried in order by `load()`:

1. a prebuilt `peft_fast._C` (setup.py builds it when a CUDA toolkit and a CUDA build of
   torch are present at install time);
2. a JIT build with ninja (`torch.utils.cpp_extension.load`) into a cache directory,
   `$PEFT_FAST_CACHE` or `~/.cache/peft_fast/cuda/<torch>-<cuda>-sm<cc>`, on first use;
   later processes reuse it (ninja rebuilds only when a source changed);
3. neither: `unavailable_reason()` says why (no CUDA device, no nvcc, or the build failed
   and where its log is), and dispatch uses the other backends.

Importing this module needs no GPU, nvcc or built library. The library is loaded with
`torch.ops.load_library` (it has no Python module init); its ops appear as
`torch.ops.peft_fast.*_cuda`.

`python -m peft_fast.ops.cuda.build --check` compiles every file in csrc/ with nvcc (no GPU
needed; CI runs it on its CPU machine against the CPU build of torch's headers) and reports
each file's time; a compile error fails it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SOURCE_SUFFIXES = (".cu", ".cpp")
HEADER_SUFFIXES = (".cuh", ".h")
LIBRARY_NAME = "peft_fast_C"
# Warnings the CPU build of torch 2.13's own headers raise under C++17 (they target C++20):
# silenced so a real warning in our files stands out.
_HEADER_NOISE = ["-diag-suppress", "3306", "-Xcompiler", "-Wno-c++20-extensions"]

_lock = threading.Lock()
_loaded = False
_failure: str | None = None


class CudaBuildError(RuntimeError):
    """The CUDA extension could not be built or loaded; the message says why (and where the log is)."""


def source_dir() -> Path:
    """The csrc/ folder: next to the package in a source checkout, `peft_fast/csrc` when installed."""
    package = Path(__file__).resolve().parents[2]  # peft_fast/ (this file: peft_fast/ops/cuda/build.py)
    for candidate in (package.parent / "csrc", package / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise CudaBuildError(f"csrc/ sources not found next to {package} (looked for csrc/ops.cpp)")


def sources() -> list[Path]:
    """Every .cu and .cpp file of csrc/, sorted (what the extension and the compile check build)."""
    return sorted(p for p in source_dir().iterdir() if p.suffix in SOURCE_SUFFIXES)


def cuda_home() -> Path | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else the folder above `nvcc` on PATH,
    else /usr/local/cuda; None when none holds bin/nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").is_file():
            return Path(c)
    return None


def nvcc_path() -> Path | None:
    """The nvcc that builds and checks the kernels, or None."""
    home = cuda_home()
    if home is not None:
        return home / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found) if found else None


def _prebuilt_path() -> Path | None:
    try:
        spec = importlib.util.find_spec("peft_fast._C")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def cache_dir() -> Path:
    """Where the JIT build goes: $PEFT_FAST_CACHE, else ~/.cache/peft_fast/cuda/<torch>-<cuda>-<arch>."""
    import torch

    root = os.environ.get("PEFT_FAST_CACHE")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "peft_fast" / "cuda"
    arch = "noarch"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm{major}{minor}"
    tag = f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}-{arch}"
    return base / tag


def _sources_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(source_dir().iterdir()):
        if p.suffix in SOURCE_SUFFIXES + HEADER_SUFFIXES:
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:12]


def unavailable_reason() -> str | None:
    """None when the CUDA kernels can be loaded here (prebuilt, already loaded, or buildable),
    else a precise reason: no CUDA device, torch without CUDA, no nvcc, or an earlier build
    failure with its log path. Cheap: never builds."""
    import torch

    if _loaded:
        return None
    if _failure is not None:
        return _failure
    if torch.version.cuda is None:
        return "this torch build has no CUDA support (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if _prebuilt_path() is None and nvcc_path() is None:
        return "no prebuilt peft_fast._C and no nvcc to JIT-build it (install the CUDA toolkit or set CUDA_HOME)"
    return None


def load() -> None:
    """Load the kernels' library once per process (prebuilt, else JIT-built into `cache_dir()`);
    CudaBuildError with the reason and the build log's path when that fails."""
    global _loaded, _failure
    with _lock:
        if _loaded:
            return
        if _failure is not None:
            raise CudaBuildError(_failure)
        reason = unavailable_reason()
        if reason is not None:
            raise CudaBuildError(reason)
        import torch

        prebuilt = _prebuilt_path()
        try:
            if prebuilt is not None:
                torch.ops.load_library(str(prebuilt))
            else:
                _jit_build()
        except CudaBuildError as e:
            _failure = str(e)
            raise
        except Exception as e:  # a loader error: keep the reason for `peft-fast info`
            _failure = f"loading the CUDA kernels failed ({type(e).__name__}: {e})"
            raise CudaBuildError(_failure) from e
        _loaded = True


def _jit_build() -> None:
    import torch.utils.cpp_extension as cpp

    build_dir = cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    home = cuda_home()
    if home is not None:
        os.environ.setdefault("CUDA_HOME", str(home))
    started = time.perf_counter()
    try:
        cpp.load(
            name=LIBRARY_NAME,
            sources=[str(p) for p in sources()],
            extra_include_paths=[str(source_dir())],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:
        log.write_text(f"sources digest {_sources_digest()}\n{type(e).__name__}: {e}\n")
        raise CudaBuildError(f"building the CUDA kernels failed; log: {log}") from e
    log.write_text(f"sources digest {_sources_digest()}\nbuilt in {time.perf_counter() - started:.1f} s\n")


# ---- compile check (CI, no GPU) ------------------------------------------------------------


def compile_flags(archs: list[str], std: str = "c++17") -> list[str]:
    """nvcc flags of the compile check: torch's include paths and ABI, CUDA headers, csrc/,
    torch's own nvcc defines (COMMON_NVCC_FLAGS), one -gencode per arch ("sm_90", "sm_80")."""
    import torch
    import torch.utils.cpp_extension as cpp

    torch_include = Path(torch.__file__).parent / "include"
    includes = [torch_include, torch_include / "torch" / "csrc" / "api" / "include", source_dir()]
    home = cuda_home()
    if home is not None:
        includes.append(home / "include")
    flags = [f"-I{p}" for p in includes]
    flags += [
        f"-std={std}",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-DTORCH_EXTENSION_NAME={LIBRARY_NAME}",
        "-O3",
        "-Xcompiler",
        "-fPIC",
    ]
    flags += list(cpp.COMMON_NVCC_FLAGS) + _HEADER_NOISE
    for arch in archs:
        cc = arch.removeprefix("sm_")
        flags += ["-gencode", f"arch=compute_{cc},code=sm_{cc}"]
    return flags


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def parse_ptxas(output: str) -> list[dict[str, object]]:
    """One dict per kernel entry in `nvcc -Xptxas -v` output: function, arch, registers, stack
    bytes, spill store/load bytes and static shared memory bytes."""
    rows: list[dict[str, object]] = []
    current: dict[str, object] | None = None
    for line in output.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = {"function": m.group(1), "arch": m.group(2), "registers": None, "stack_bytes": 0}
            current.update({"spill_store_bytes": 0, "spill_load_bytes": 0, "smem_bytes": 0})
            rows.append(current)
        elif current is not None and (m := _PTXAS_STACK.search(line)):
            current["stack_bytes"], current["spill_store_bytes"], current["spill_load_bytes"] = map(int, m.groups())
        elif current is not None and (m := _PTXAS_USED.search(line)):
            current["registers"] = int(m.group(1))
            current["smem_bytes"] = int(m.group(2) or 0)
    return rows


def compile_check(
    jobs: int = 2, archs: list[str] | None = None, std: str = "c++17", stats_json: str | None = None
) -> int:
    """nvcc -c every file of csrc/ (at most `jobs` at once) with ptxas' resource report, print each
    file's time, compiler warnings and each kernel's registers / stack / spills / smem; 0 when all
    compile without spills, 1 when one fails or spills, 2 when there is no nvcc. `stats_json`
    writes the per-kernel report there."""
    nvcc = nvcc_path()
    if nvcc is None:
        print("compile check: no nvcc found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 2
    archs = archs or ["sm_90"]
    flags = compile_flags(archs, std) + ["-Xptxas=-v"]
    files = sources()
    print(f"compile check: {len(files)} files, {nvcc}, {' '.join(archs)}, -std={std}, {jobs} jobs", flush=True)

    def one(path: Path) -> tuple[Path, float, int, str]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            proc = subprocess.run(
                [str(nvcc), "-c", str(path), "-o", str(Path(tmp) / (path.name + ".o")), *flags],
                capture_output=True,
                text=True,
            )
            return path, time.perf_counter() - t0, proc.returncode, (proc.stdout + proc.stderr).strip()

    started = time.perf_counter()
    failed = spilled = 0
    stats: list[dict[str, object]] = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for path, seconds, rc, output in pool.map(one, files):
            status = "ok" if rc == 0 else f"FAILED (exit {rc})"
            print(f"  {path.name:<24} {seconds:6.1f} s  {status}", flush=True)
            kernels = parse_ptxas(output)
            other = [ln for ln in output.splitlines() if "ptxas info" not in ln and not ln.startswith("    ")]
            if other or rc != 0:
                print("\n".join("    " + line for line in (output.splitlines() if rc else other)), flush=True)
            for k in kernels:
                k["file"] = path.name
                spill = int(k["spill_store_bytes"]) + int(k["spill_load_bytes"])  # type: ignore[call-overload]
                spilled += spill > 0
                print(
                    f"    {k['arch']:<6} regs {k['registers']!s:>3}  stack {k['stack_bytes']!s:>4}  "
                    f"spill {spill:>4}  smem {k['smem_bytes']!s:>6}  {str(k['function'])[:70]}"
                )
            stats += kernels
            failed += rc != 0
    print(f"compile check: {len(files) - failed}/{len(files)} compiled in {time.perf_counter() - started:.1f} s")
    if stats_json:
        Path(stats_json).write_text(json.dumps(stats, indent=1))
    if spilled:
        print(f"compile check: {spilled} kernel(s) spill registers (see 'spill' above)")
    return 1 if failed or spilled else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m peft_fast.ops.cuda.build --check` (compile check) or `--build` (load/JIT-build now)."""
    parser = argparse.ArgumentParser(prog="python -m peft_fast.ops.cuda.build", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="nvcc -c every csrc/ file (no GPU needed)")
    mode.add_argument("--build", action="store_true", help="build or load peft_fast._C now (needs a CUDA device)")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="files compiled at once (default 2)")
    parser.add_argument("--arch", action="append", help="sm_XX target, repeatable (default sm_90)")
    parser.add_argument("--std", default="c++17", help="C++ standard (default c++17, torch 2.11's)")
    parser.add_argument("--stats-json", help="with --check: write each kernel's ptxas resource report here")
    args = parser.parse_args(argv)
    if args.check:
        return compile_check(args.jobs, args.arch, args.std, args.stats_json)
    try:
        load()
    except CudaBuildError as e:
        print(f"peft_fast CUDA kernels unavailable: {e}", file=sys.stderr)
        return 1
    print(f"peft_fast CUDA kernels loaded (cache {cache_dir()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
