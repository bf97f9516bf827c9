#!/usr/bin/env bash
# Mutation testing of peft_fast with mutmut 3 (pip install mutmut==3.8.1), one module at a time.
#
#   bench/mutation.sh [MODULE::TESTS ...]
#
# MODULE is a file to mutate, TESTS the pytest arguments selecting the tests that should
# kill its mutants (keep them fast: every mutant runs them). Without arguments it runs the
# subset recorded in bench/results/mutation.md. Each module runs in its own copy of the
# working tree under $WORK (default: a fresh temp folder), so the checkout is never touched.
#
#   bench/mutation.sh peft_fast/ops/reference.py::tests/ops/test_reference.py \
#       "peft_fast/save_and_load.py::tests/test_peft_model.py -k save_load or state_dict"
#
# Environment: PYTHON (default: python), JOBS (mutmut --max-children, default 2),
# REPORT (default: bench/results/mutation-<date>.md; "-" prints to stdout only).
#
# Not for kernels/: mutmut 3 wraps every function in a trampoline, which `@triton.jit`
# cannot compile, and the editable install maps peft_fast.kernels to the checkout's
# kernels/ folder, not the mutated copy. See bench/results/mutation.md.
set -euo pipefail

PYTHON=${PYTHON:-python}
JOBS=${JOBS:-2}
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
stamp=$(date -u +%Y-%m-%d)
REPORT=${REPORT:-$repo/bench/results/mutation-$stamp.md}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/peft-fast-mutation.XXXXXX")}

if [ $# -eq 0 ]; then
    set -- \
        "peft_fast/ops/reference.py::tests/ops/test_reference.py tests/test_embedding_options.py tests/test_reference_dropout.py" \
        "peft_fast/save_and_load.py::tests/test_peft_model.py tests/test_interop.py -k save or load or state_dict"
fi

summary=""
details=""
for spec in "$@"; do
    module=${spec%%::*}
    tests=${spec#*::}
    [ -f "$repo/$module" ] || { echo "no such module: $module" >&2; exit 2; }
    dir=$WORK/$(echo "$module" | tr '/.' '__')
    rm -rf "$dir" && mkdir -p "$dir"
    # the working tree as it is (tracked and untracked, not ignored files), without results
    (cd "$repo" && git ls-files -co --exclude-standard | grep -v '^bench/results/' | tar -cf - -T -) | tar -xf - -C "$dir"
    # the test selection: paths, then everything after -k as one expression
    paths=${tests%% -k *}
    {
        echo "[mutmut]"
        echo "source_paths=peft_fast"
        echo "only_mutate=$module"
        # a loaded 2-core machine makes test times noisy: generous timeouts, so a timeout means a hang
        echo "timeout_multiplier=${TIMEOUT_MULTIPLIER:-40}"
        echo "timeout_constant=${TIMEOUT_CONSTANT:-20}"
        echo "pytest_add_cli_args_test_selection="
        for p in $paths; do echo "    $p"; done
        if [ "$paths" != "$tests" ]; then
            echo "    -k"
            echo "    ${tests#* -k }"
        fi
        echo "also_copy="
        echo "    tests"
        echo "    kernels"
        echo "    csrc"
    } > "$dir/setup.cfg"
    echo "== $module ($tests) in $dir" >&2
    # mutmut forks a warm test process per mutant: one thread per process, or torch's and
    # OpenMP's thread pools deadlock in the forked children
    (cd "$dir" && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PYTHON" -m mutmut run --max-children "$JOBS" \
        > mutmut-run.log 2>&1) || true
    (cd "$dir" && "$PYTHON" -m mutmut results --all true > results.txt 2>&1) || true
    count() { grep -c ": $1\$" "$dir/results.txt" || true; }
    killed=$(count killed); survived=$(count survived); timeout=$(count timeout)
    suspicious=$(count suspicious); notests=$(count "no tests"); skipped=$(count skipped)
    unchecked=$(count "not checked")
    total=$((killed + survived + timeout + suspicious + notests + skipped + unchecked))
    summary+="| \`$module\` | \`$tests\` | $total | $killed | $timeout | $survived | $notests | $suspicious | $unchecked |"$'\n'
    details+=$'\n'"### $module: surviving and untested mutants"$'\n\n'
    while read -r name; do
        details+='```diff'$'\n'"$(cd "$dir" && "$PYTHON" -m mutmut show "$name" 2>&1 | tail -n +1)"$'\n''```'$'\n'
    done < <(grep -E ": (survived|no tests)$" "$dir/results.txt" | sed 's/:.*//; s/^ *//')
done

report=$(cat <<EOF
# Mutation testing (mutmut)

- date: $(date -u '+%Y-%m-%d %H:%M UTC')
- commit: $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet || echo " (with uncommitted changes)")
- versions: python $("$PYTHON" -c 'import platform; print(platform.python_version())'), mutmut $("$PYTHON" -c 'import importlib.metadata as m; print(m.version("mutmut"))'), torch $("$PYTHON" -c 'import torch; print(torch.__version__)')
- command: \`bench/mutation.sh$(printf ' "%s"' "$@")\`

Timeouts count as killed (the mutant hung the tests).

| module | tests | mutants | killed | timeout | survived | no tests | suspicious | not checked |
|---|---|---|---|---|---|---|---|---|
$summary
$details
EOF
)
if [ "$REPORT" = "-" ]; then
    echo "$report"
else
    echo "$report" > "$REPORT"
    echo "report: $REPORT" >&2
fi
