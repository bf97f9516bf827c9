"""The static audit (kernels/audit.py), the csrc ptxas report and the roofline model: that launches are
recorded and specialized as the JIT would, that compiled code is read correctly, and that the
checks CI relies on flag what they must. The full audit over every variant runs in .ci/run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

from peft_fast.kernels import audit, configs, roofline  # noqa: E402
from peft_fast.ops.cuda.build import parse_ptxas  # noqa: E402

# Recording and compiling need real @triton.jit functions, and conftest turns on Triton's interpreter
# (which replaces them) for the kernel tests: those parts run in a fresh process without it.
PROBE = r"""
import json, torch
from peft_fast.kernels import audit, configs
def launches(family, make):
    with audit.recording(family) as out:
        make(torch.bfloat16)
    return out
def plain(launch):
    return {"kernel": launch.kernel, "signature": launch.signature, "options": launch.options,
            "constexprs": {k: (v if isinstance(v, (int, float, bool, str)) or v is None else str(v))
                           for k, v in launch.constexprs.items()},
            "attrs": {",".join(map(str, k)): v for k, v in launch.attrs.items()}}
out = {
    "fwd90": plain(launches("sm90", lambda d: audit._lora_expand(d, "fwd"))[0]),
    "fwd80": plain(launches("sm80", lambda d: audit._lora_expand(d, "fwd"))[0]),
    "bwd90": plain(launches("sm90", lambda d: audit._lora_expand(d, "bwd_dx_dropout"))[0]),
    "family_after": configs.gpu_family(torch.device("cpu")),
    "unrecorded": [v.name for v in audit.variants()
                   if not launches("sm90", lambda d, v=v: v.make(torch.float32 if v.dtypes == ("fp32",) else d))],
    "rows": {},
}
for fam in ("sm90", "sm80"):
    (launch,) = launches(fam, lambda d: audit._lora_shrink(d, "fwd"))
    out["rows"][fam] = audit.as_dicts([audit._audit_one(("lora_shrink/fwd", fam, "bf16", False, launch))])[0]
print("PROBE" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE"))
    return json.loads(line[len("PROBE") :])


def test_recording_uses_the_audited_familys_config_rows_and_runs_nothing(probe):
    fwd, cfg = probe["fwd90"], configs._MATMUL[("sm90", False)]
    assert fwd["kernel"] == "_lora_expand_kernel"
    cx = fwd["constexprs"]
    assert (cx["BLOCK_M"], cx["BLOCK_N"], cx["BLOCK_K"]) == (cfg.block_m, cfg.block_n, cfg.block_k)
    assert fwd["options"] == {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    assert probe["fwd80"]["constexprs"]["BLOCK_K"] == configs._MATMUL[("sm80", False)].block_k
    # the recorder is removed afterwards: gpu_family answers for real devices again
    assert probe["family_after"] == "interpreter"
    assert probe["unrecorded"] == []  # every variant makes at least one launch


def test_specialization_follows_the_jit(probe):
    sig, cx, attrs = probe["fwd90"]["signature"], probe["fwd90"]["constexprs"], probe["fwd90"]["attrs"]
    assert sig["x_ptr"] == "*bf16" and sig["h_ptr"] == "*fp32" and sig["out_ptr"] == "*bf16"
    # unit inner strides become constexpr 1, the others stay i32 (divisible by 16 here)
    assert cx["stride_xk"] == 1 and cx["stride_wk"] == 1 and sig["stride_xm"] == "i32"
    assert attrs[str(list(sig).index("stride_xm"))] == [["tt.divisibility", 16]]
    assert cx["HAS_BIAS"] is False and cx["DROPOUT"] is False
    # backward reads W and A through transposes: the unit stride moves to the other dimension
    bwd = probe["bwd90"]
    assert bwd["constexprs"]["stride_wn"] == 1 and bwd["signature"]["stride_wk"] == "i32"
    assert bwd["constexprs"]["DROPOUT"] is True and bwd["signature"]["keep_ptr"] == "*u8"


def test_a_real_compile_reads_registers_and_tensor_core_instructions(probe):
    row = probe["rows"]["sm90"]
    assert row["error"] is None, row["error"]
    assert 0 < row["registers"] <= 255 and row["stack_bytes"] == 0 and row["local_bytes"] == 0
    assert row["hgmma"] > 0 and row["hmma"] == 0  # Hopper's warpgroup MMA for a 64-row bf16 tile
    assert row["sass_instructions"] > 50 and row["shared_bytes"] > 0
    sm80 = probe["rows"]["sm80"]
    assert sm80["error"] is None and sm80["hgmma"] == 0 and sm80["hmma"] > 0  # Ampere has no HGMMA


def test_check_flags_spills_smem_compile_errors_and_missing_hgmma():
    ok = audit.Row("v", "k", "sm90", "bf16", True, {"BLOCK_M": 128}, 100, 0, 0, 1000, 4, 0, 0, 500)
    assert audit.check([ok]) == []
    spill = audit.Row("v", "k", "sm90", "bf16", False, {}, 255, 8, 0, 1000, 0, 0, 0, 500)
    smem = audit.Row("v", "k", "sm80", "bf16", False, {}, 100, 0, 0, audit.SMEM_LIMIT["sm80"] + 1, 0, 4, 0, 500)
    broken = audit.Row("v", "k", "sm90", "bf16", False, error="CompilationError: boom")
    no_wgmma = audit.Row("v", "k", "sm90", "fp16", True, {"BLOCK_M": 128}, 100, 0, 0, 1000, 0, 8, 0, 500)
    fp32 = audit.Row("v", "k", "sm90", "fp32", True, {"BLOCK_M": 128}, 100, 0, 0, 1000, 0, 0, 0, 500)
    found = audit.check([spill, smem, broken, no_wgmma, fp32])
    assert len(found) == 4
    assert "spills" in found[0] and "shared memory" in found[1] and "does not compile" in found[2]
    assert "no HGMMA" in found[3]


PTXAS = """\
ptxas info    : Compiling entry function '_Z11sgmv_shrinkPf' for 'sm_90'
ptxas info    : Function properties for _Z11sgmv_shrinkPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z4ia3fPf' for 'sm_80'
ptxas info    : Function properties for _Z4ia3fPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 0 barriers, 380 bytes cmem[0]
"""


def test_parse_ptxas_reads_each_kernels_resources():
    first, second = parse_ptxas(PTXAS)
    assert first == {
        "function": "_Z11sgmv_shrinkPf",
        "arch": "sm_90",
        "registers": 64,
        "stack_bytes": 16,
        "spill_store_bytes": 8,
        "spill_load_bytes": 4,
        "smem_bytes": 4096,
    }
    assert second["arch"] == "sm_80" and second["registers"] == 30 and second["spill_store_bytes"] == 0
    assert second["smem_bytes"] == 0


def test_roofline_counts_by_hand():
    M, K, N, r = 8192, 4096, 4096, 16
    gpu = {"name": "test", "flops": 1e15, "bytes_per_s": 1e12, "launch_s": 0.0}
    pred = roofline.predict(M, K, N, r, gpu=gpu)
    # bare linear: two M×K×N products, each max(2MKN / 1e15, 2 bytes · (MK + KN + MN) / 1e12)
    one = max(2 * M * K * N / 1e15, 2 * (M * K + K * N + M * N) / 1e12)
    assert pred["seconds"]["linear"] == pytest.approx(2 * one)
    # every implementation does the linear's work and more; the unfused one moves the most bytes
    s = pred["seconds"]
    assert s["linear"] < s["fused"] < s["hf_peft"] and s["linear"] < s["composite"] < s["hf_peft"]
    assert pred["over_linear"]["linear"] == 1.0 and pred["over_hf_peft"]["hf_peft"] == 1.0
    with pytest.raises(ValueError, match="impl must be one of"):
        roofline.step_kernels("nope", M, K, N, r)
