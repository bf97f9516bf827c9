#!/usr/bin/env bash
# One GPU round in one call: install, load the backends, GPU-marked and kernel tests on CUDA,
# the static audit (when `peft-fast audit` exists), the quick benchmarks (LoRA, IA³, mixed
# batch: ours vs bare frozen linear vs HF peft, one process), the end-to-end training step, the
# other methods' suites (variants, xlora, and qlora's per-layer 4-bit benchmark), then a short
# table. Every stage has its own time limit (a hang costs that stage only); the limits add up to 600 s. Output: at most 8 files under the output folder, 16 MiB each:
#   round.log  every stage's output but the tests'    tests.log  both test stages
#   <device>-quick-<date>.json/.png   <device>-e2e-<date>.json   audit.json   summary.json
#
#   OUT=/path bash bench/gpu_round.sh               on the GPU machine (the device tool sets $OUT)
#   bash bench/gpu_round.sh --dry-run [--out DIR]   on CPU: the same stages, tiny sizes, no install
#
# Then, on the development machine: peft-fast bench --ingest <the folder>   (see bench/NOTES.md)
# PYTHON (default python3) is the interpreter; LIMIT_<STAGE> (e.g. LIMIT_BENCH=200) overrides a limit.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
OUT_DIR="${OUT:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
        *) echo "gpu_round.sh: unknown argument $1 (expected --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$OUT_DIR" ]; then
    if [ "$DRY" = 1 ]; then OUT_DIR="$(mktemp -d)"; else echo "gpu_round.sh: set \$OUT or pass --out DIR" >&2; exit 2; fi
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
LOG="$OUT_DIR/round.log"
TESTLOG="$OUT_DIR/tests.log"
STAGES="$OUT_DIR/stages.tsv"
: >"$STAGES"

if [ "$DRY" = 1 ]; then
    PRESET=tiny; ROUNDS=(--rounds 3)
    # small selections: the stages run, collection stays quick (CI runs this)
    GPU_TESTS=(-m gpu tests/bench/test_bench_timing.py); KERNEL_TESTS=(tests/ops/test_dispatch_table.py)
else
    PRESET=quick; ROUNDS=()
    GPU_TESTS=(-m gpu tests); KERNEL_TESTS=()
    for p in tests/ops tests/test_mixed_batch_triton.py tests/test_patch.py; do
        [ -e "$p" ] && KERNEL_TESTS+=("$p")
    done
fi
# A hung test costs that test only where pytest-timeout is installed (it is on the GPU image).
PER_TEST=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout=60)

limit() {  # limit STAGE DEFAULT: $LIMIT_<STAGE> or the default
    local var="LIMIT_$(echo "$1" | tr 'a-z-' 'A-Z_')"
    echo "${!var:-$2}"
}

stage() {  # stage NAME DEFAULT_LIMIT LOGFILE COMMAND...: run it under `timeout`, record status and seconds
    local name=$1 secs log=$3 t0=$SECONDS rc
    secs=$(limit "$1" "$2")
    shift 3
    echo "=== $name (limit ${secs} s): $*" >>"$log"
    timeout -k 5 "$secs" "$@" >>"$log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$STAGES"
    echo "stage $name: exit $rc after $((SECONDS - t0)) s"
}

skip() {  # skip NAME REASON: recorded with status 99 (report.STAGE_SKIPPED)
    echo "=== $1 skipped: $2" >>"$LOG"
    printf '%s\t99\t0\n' "$1" >>"$STAGES"
    echo "stage $1: skipped ($2)"
}

echo "GPU round $( [ "$DRY" = 1 ] && echo '(dry run, CPU, tiny sizes) ')-> $OUT_DIR"
if [ "$DRY" = 1 ]; then
    stage install 60 "$LOG" "$PY" -c "import peft_fast, peft_fast_bench; print('dry run: not installing; using', peft_fast.__file__)"
else
    # CUDA extension left to the backends stage (its own limit); see ../shared/GPU.md for the install line.
    stage install 40 "$LOG" env PEFT_FAST_BUILD_CUDA=0 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi

# Loads every backend (the CUDA one JIT-builds csrc/ here, MAX_JOBS at once) and prints
# versions and devices. On a GPU an unavailable kernel backend fails the stage.
stage backends 80 "$LOG" env MAX_JOBS="${MAX_JOBS:-16}" "$PY" -c "
import torch, peft_fast
from peft_fast.cli import main
main(['info'])
missing = {b: r for b, r in peft_fast.available_backends().items() if r is not None}
raise SystemExit(1 if torch.cuda.is_available() and missing else 0)
"
[ "$DRY" = 1 ] || stage nvidia-smi 10 "$LOG" nvidia-smi

# -v: one line per test as it ends, so a stage stopped at its limit still says what passed.
stage gpu-tests 50 "$TESTLOG" "$PY" -m pytest -v -p no:cacheprovider -rfE "${PER_TEST[@]}" "${GPU_TESTS[@]}"
stage kernel-tests 70 "$TESTLOG" "$PY" -m pytest -v -p no:cacheprovider -rfE "${PER_TEST[@]}" "${KERNEL_TESTS[@]}"

# The static audit for this GPU's family (sm_90a): registers, spills, shared memory, HGMMA per
# kernel variant; --check fails the stage on a finding. The dry run checks the command only
# (compiling every variant takes minutes on two cores; CI's .ci/run runs the full audit).
if "$PY" -m peft_fast.cli audit --help >/dev/null 2>&1; then
    if [ "$DRY" = 1 ]; then
        stage audit 50 "$LOG" "$PY" -m peft_fast.cli audit --help
    else
        stage audit 50 "$LOG" "$PY" -m peft_fast.cli audit --arch sm90 --jobs 16 --check --json "$OUT_DIR/audit.json"
    fi
else
    skip audit "\`peft-fast audit --help\` fails: no audit in this peft_fast (or Triton missing)"
fi

stage bench 85 "$LOG" "$PY" -m peft_fast_bench --suite quick --preset "$PRESET" "${ROUNDS[@]}" --out "$OUT_DIR"
stage e2e 80 "$LOG" "$PY" -m peft_fast_bench --suite e2e --preset "$PRESET" --no-plot --out "$OUT_DIR"
# The methods that landed after the quick preset (LoHa, LoKr, DoRA, AdaLoRA, VeRA; QLoRA; X-LoRA),
# ours vs HF peft in each suite's own process, each under its own limit; their tables go to
# round.log (no files: the round returns 8 at most).
# qlora on a GPU is its per-layer benchmark (bench/qlora_layers.py), quick preset: 8 of the 12
# (shape, M) cases, 3 variants, fwd and fwd+bwd, peak memory, the issue's targets (~40 s with
# Triton's compiles, estimated: unmeasured). The dry run times one variant method (a tiny model per
# method and library costs ~10 s on CPU) and runs qlora's tiny preset: its CPU model step and the
# layer harness, the fused kernels under Triton's interpreter (dry-run limits: most to variants, the slowest on a busy CPU).
VARIANT_METHODS=loha,lokr,dora,adalora,vera
METHOD_SUITES="variants:30 xlora:25 qlora:60"
if [ "$DRY" = 1 ]; then VARIANT_METHODS=lokr; METHOD_SUITES="variants:50 qlora:40 xlora:28"; fi
stage methods 120 "$LOG" bash -c '
    rc=0
    for s in $4; do
        more=(); [ "${s%%:*}" = variants ] && more=(--methods "$3")
        run=(); [ "${s%%:*}" = qlora ] && [ "$5" = 1 ] && run=(env TRITON_INTERPRET=1)
        timeout -k 2 "${s#*:}" "${run[@]}" "$1" -m peft_fast_bench --suite "${s%%:*}" --preset "$2" "${more[@]}" \
            || { echo "suite ${s%%:*}: exit $?"; rc=1; }
    done
    exit $rc' _ "$PY" "$PRESET" "$VARIANT_METHODS" "$METHOD_SUITES" "$DRY"

# The transfer back takes at most 8 files of 16 MiB: keep a log's end if it grew past that.
for f in "$OUT_DIR"/*; do
    if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 16000000 ]; then
        tail -c 15000000 "$f" >"$f.tail" && mv "$f.tail" "$f" && echo "kept the last 15 MB of $(basename "$f")"
    fi
done
# Last: summary.json (it holds the stage list, so stages.tsv goes) and the short table.
failed=$(awk -F'\t' '$2 != 0 && $2 != 99' "$STAGES" | wc -l)
echo
if timeout -k 5 "$(limit summary 15)" "$PY" -m peft_fast_bench.report "$OUT_DIR" | tee -a "$LOG"; then
    rm -f "$STAGES"
else
    echo "summary failed: stages.tsv and the logs hold the round"
    failed=$((failed + 1))
fi
count=$(find "$OUT_DIR" -maxdepth 1 -type f | wc -l)
[ "$count" -le 8 ] || echo "WARNING: $count files under $OUT_DIR; only 8 come back"
echo "$failed stage(s) failed; files: $OUT_DIR"
[ "$failed" = 0 ]
