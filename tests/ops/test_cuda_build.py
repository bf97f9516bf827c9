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


@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler")
def test_philox_keep_bytes_match_triton_and_the_oracle(tmp_path):
    """csrc/philox.h's `keep_byte` (what csrc/keep_bytes.cu writes, compiled for the host) gives
    the bytes of kernels/dropout.py's `draw_keep_bytes` and the oracle's mask packed 8 to a
    byte (bit j: element 8g + j), 0xff for p = 0; `keep_bits` (what the shrink, dx and dA
    kernels read) unpacks them to `dropout_keep` for every element, at every offset in a byte."""
    from philox_oracle import keep_mask

    pytest.importorskip("triton")
    if dispatch.unavailable_reason("triton") is not None:
        pytest.skip(f"triton backend unavailable: {dispatch.unavailable_reason('triton')}")
    from peft_fast.kernels.dropout import draw_keep_bytes

    M, K, p, seeds = 11, 45, 0.35, (7, 2**31 - 2)  # K not a multiple of 8: a partial last byte
    G = (K + 7) // 8
    src = tmp_path / "keep.cpp"
    src.write_text(
        '#include "philox.h"\n#include <cstdio>\n#include <cstdint>\n#include <cstdlib>\n#include <vector>\n'
        "int main(int argc, char** argv) {\n"
        "  unsigned long long seed = std::strtoull(argv[1], nullptr, 10);\n"
        f"  std::vector<uint8_t> kb({M} * {G});\n"
        f"  for (long m = 0; m < {M}; ++m)\n"
        f"    for (long g = 0; g < {G}; ++g) kb[m * {G} + g] = peft_fast::keep_byte(seed, m, g, {K}, {p}f);\n"
        f'  for (long i = 0; i < {M * G}; ++i) std::printf("%d ", kb[i]);\n'
        '  std::printf("\\n");\n'
        # every element through keep_bits, read at its own offset and from each earlier one of its byte
        "  int bad = 0;\n"
        f"  for (long m = 0; m < {M}; ++m)\n"
        f"    for (long k = 0; k < {K}; ++k)\n"
        "      for (long k0 = k & ~7L; k0 <= k; ++k0)\n"
        f"        bad += ((peft_fast::keep_bits(kb.data(), {G}, m, k0) >> (k - k0)) & 1u) !=\n"
        f"               (peft_fast::dropout_keep(seed, m, k, {K}, {p}f) ? 1u : 0u);\n"
        f'  std::printf("%d %d\\n", bad, peft_fast::keep_byte(seed, 3, 2, {K}, 0.f));\n'
        "}\n"
    )
    exe = tmp_path / "keep"
    subprocess.run(["c++", "-std=c++17", "-O2", f"-I{cuda_build.source_dir()}", str(src), "-o", str(exe)], check=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed in seeds:
        lines = subprocess.run([str(exe), str(seed)], check=True, capture_output=True, text=True).stdout.splitlines()
        ours = torch.tensor([int(v) for v in lines[0].split()], dtype=torch.uint8).reshape(M, G)
        bad, zero_p = (int(v) for v in lines[1].split())
        assert bad == 0 and zero_p == 0xFF, seed
        theirs = draw_keep_bytes(torch.tensor([seed], device=device), M, K, p, device).cpu()
        assert torch.equal(ours, theirs), seed
        bits = (ours.long()[:, :, None] >> torch.arange(8)) & 1
        unpacked = bits.reshape(M, -1)[:, :K].bool()
        assert torch.equal(unpacked, torch.from_numpy(keep_mask(seed, M, K, p))), seed
