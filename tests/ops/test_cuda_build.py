"""peft_fast/ops/cuda/build.py and csrc/ on a CPU machine: what can be checked without a GPU.

The nvcc compile check of every csrc/ file runs in .ci/run (`python -m
peft_fast.ops.cuda.build --check`, a few minutes on two cores), not here, so the test suite
stays quick; these tests cover the loader's reasons and the Philox mask's bit-compatibility.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

import peft_fast
from peft_fast.ops import dispatch
from peft_fast.ops.cuda import build as cuda_build


def test_sources_and_flags():
    names = [p.name for p in cuda_build.sources()]
    assert "ops.cpp" in names and all(n.endswith((".cu", ".cpp")) for n in names)
    assert {"sgmv_shrink.cu", "sgmv_expand.cu", "sgmv_adapter_grad.cu", "ia3_scale.cu"} <= set(names)
    flags = cuda_build.compile_flags(["sm_90", "sm_80"])
    assert "arch=compute_90,code=sm_90" in flags and "arch=compute_80,code=sm_80" in flags
    assert f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}" in flags


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given without a GPU")
def test_cuda_backend_says_why_it_is_unavailable():
    reason = peft_fast.available_backends()["cuda"]
    assert reason is not None
    assert "CUDA" in reason
    with pytest.raises(RuntimeError, match="cuda"):
        peft_fast.set_backend("cuda")
    with pytest.raises(cuda_build.CudaBuildError):
        cuda_build.load()


def test_compile_check_without_nvcc_reports_it(monkeypatch, capsys):
    monkeypatch.setattr(cuda_build, "nvcc_path", lambda: None)
    assert cuda_build.compile_check() == 2
    assert "no nvcc" in capsys.readouterr().err


def test_auto_order_comes_from_the_table(monkeypatch):
    monkeypatch.setattr(dispatch, "_table_cache", {"entries": {"lora_linear": {"tokens<=256": ["cuda", "torch"]}}})
    small, big = torch.empty(4, 3, 8), torch.empty(5000, 8)
    assert dispatch.shape_class(small) == "tokens<=256" and dispatch.shape_class(big) == "tokens>4096"
    # measured first, then the op's composite-only default without them
    assert dispatch.auto_order("lora_linear", small) == ("cuda", "torch", "triton_composite")
    assert dispatch.auto_order("lora_linear", big) == ("triton_composite", "cuda", "torch")
    assert dispatch.auto_order("ia3_linear", small) == ("cuda", "torch")


def test_shipped_table_is_unmeasured_and_auto_prefers_the_composite():
    import json

    table = json.loads(dispatch.BACKEND_TABLE.read_text())
    assert table["entries"] == {} and table["source"] is None  # no invented numbers
    assert dispatch.AUTO_DEFAULT["lora_linear"][0] == "triton_composite"


@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler")
def test_philox_matches_triton_dropout_mask(tmp_path):
    """csrc/philox.h (compiled for the host) draws the same keep-mask as kernels/dropout.py's
    dropout_keep for the same seed and numbering, so the CUDA and Triton backends agree."""
    pytest.importorskip("triton")
    if dispatch.unavailable_reason("triton") is not None:
        pytest.skip(f"triton backend unavailable: {dispatch.unavailable_reason('triton')}")
    from peft_fast.kernels.dropout import dropout_mask

    M, K, p, seeds = 13, 37, 0.3, (0, 1234, 2**31 - 2)
    src = tmp_path / "mask.cpp"
    src.write_text(
        '#include "philox.h"\n#include <cstdio>\n#include <cstdlib>\n'
        "int main(int argc, char** argv) {\n"
        "  unsigned long long seed = std::strtoull(argv[1], nullptr, 10);\n"
        f"  for (long i = 0; i < {M * K}; ++i)\n"
        f"    std::putchar(peft_fast::dropout_keep(seed, i / {K}, i % {K}, {K}, {p}f) ? '1' : '0');\n"
        # the 8-at-a-time form gives the same bits
        f"  for (long i = 0; i < {M * K}; ++i)\n"
        f"    std::putchar((peft_fast::dropout_keep8(seed, i / {K}, (i % {K}) & ~7L, {K}, {p}f)"
        f" >> ((i % {K}) & 7)) & 1 ? '1' : '0');\n"
        "}\n"
    )
    exe = tmp_path / "mask"
    subprocess.run(["c++", "-std=c++17", "-O2", f"-I{cuda_build.source_dir()}", str(src), "-o", str(exe)], check=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed in seeds:
        out = subprocess.run([str(exe), str(seed)], check=True, capture_output=True, text=True).stdout
        bits = torch.tensor([c == "1" for c in out])
        ours, ours8 = bits[: M * K].reshape(M, K), bits[M * K :].reshape(M, K)
        assert torch.equal(ours, ours8), seed
        theirs = dropout_mask(torch.tensor([seed], device=device), M, K, p, device).cpu()
        assert torch.equal(ours, theirs), seed
