#!/usr/bin/env bash
# Mutation testing of peft_fast with mutmut 3 (pip install mutmut==3.8.1).
#
#   bench/mutation.sh [MODULES::TESTS ...]
#
# MODULES is a file to mutate, a folder (every .py file under it), or several of these joined
# by commas; TESTS the pytest arguments selecting the tests that should kill its mutants (keep
# them fast: mutmut runs, for each mutant, the selected tests that cover the mutated function).
# Without arguments it runs the subset recorded in bench/results/mutation.md. Each spec runs in
# its own copy of the working tree under $WORK (default: a fresh temp folder), so the checkout
# is never touched.
#
#   bench/mutation.sh peft_fast/ops/reference.py::tests/ops/test_reference.py \
#       "peft_fast/save_and_load.py::tests/test_peft_model.py -k save_load or state_dict" \
#       "peft_fast/tuners/lora/,peft_fast/tuners/targets.py::tests/test_peft_model.py"
#
# Environment:
#   PYTHON   interpreter with mutmut installed (default: python)
#   JOBS     mutmut --max-children (default 2)
#   REPORT   report file (default: bench/results/mutation-<date>.md; "-" prints to stdout only)
#   SAMPLE   fraction in (0, 1]: run a seeded random sample of the mutants, stratified by file
#            (ceil(SAMPLE * n) of each file's n mutants; a larger SAMPLE, same SEED, is a superset);
#            default 1 (all of them)
#   SEED     seed of that sample (default 1)
#   MUTANTS  a file of mutant names (one a line) to run instead of all or a sample, e.g. the
#            survivors of an earlier run, to check that new tests kill them
#   WORK     folder for the copies (default: a fresh temp folder)
#   RESUME   1: with the same WORK and specs, continue an interrupted run (its copy, its selection,
#            only the mutants without a result). Stopping this script does not stop a `mutmut run`
#            already started: end that process too before resuming, or both write the same results
#
#   TIMEOUT_MULTIPLIER, TIMEOUT_CONSTANT  mutmut's limits (default 10 and 10). mutmut 3.8.1 gives
#            each mutant a CPU-time limit of 2*(t + CONSTANT)*MULTIPLIER seconds (t: the mutant's
#            tests' time in the stats run) AND a wall-clock limit of half that, (t + CONSTANT)*MULTIPLIER,
#            after which it sends SIGXCPU; both count as "timeout" (killed). The wall limit is what ends
#            a mutant that sleeps with no CPU, e.g. one blocked on the folder lock in load_peft_weights
#            (folder_lock(shared=True) taken exclusive). With the old defaults (40 and 20) that took
#            at least 800 s per such mutant; keep MULTIPLIER*CONSTANT small on a machine where a hang
#            must not eat the run, but large enough that a busy machine does not turn slow tests into
#            false timeouts.
#   FRESH    1 (default): rerun each mutant that mutmut reports "survived" in a fresh process
#            (`MUTANT_UNDER_TEST=<name> python -m pytest -x <TESTS>` from the copy's mutants/ folder)
#            and report those it kills as "killed (fresh)"; 0: skip that step.
#            Why: mutmut 3 imports the package once and forks a worker per mutant, so a mutant of a
#            function that runs only at import time (registration: register_lora_autograd,
#            register_backend_module, ...) is never active in its forked run and always looks
#            "survived". The fresh run also uses all of TESTS, not only the tests mutmut mapped to
#            the function, so it kills what a test outside that mapping catches. pytest exit codes
#            1 (a test failed) and 2 (collection error, e.g. the mutant breaks the import) count as
#            killed, a hang past FRESH_TIMEOUT seconds (default 600) as timeout, anything else as
#            survived.
#
# Not for kernels/: mutmut 3 wraps every function in a trampoline, which `@triton.jit`
# cannot compile, and the editable install maps peft_fast.kernels to the checkout's
# kernels/ folder, not the mutated copy. See bench/results/mutation.md.
set -euo pipefail

PYTHON=${PYTHON:-python}
JOBS=${JOBS:-2}
SAMPLE=${SAMPLE:-1}
SEED=${SEED:-1}
MUTANTS=${MUTANTS:-}
RESUME=${RESUME:-0}
FRESH=${FRESH:-1}
FRESH_TIMEOUT=${FRESH_TIMEOUT:-600}
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
stamp=$(date -u +%Y-%m-%d)
REPORT=${REPORT:-$repo/bench/results/mutation-$stamp.md}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/peft-fast-mutation.XXXXXX")}
[ -z "$MUTANTS" ] || MUTANTS=$(realpath "$MUTANTS")

if [ $# -eq 0 ]; then
    set -- \
        "peft_fast/ops/reference.py::tests/ops/test_reference.py tests/test_embedding_options.py tests/test_reference_dropout.py" \
        "peft_fast/save_and_load.py::tests/test_peft_model.py tests/test_interop.py -k save or load or state_dict"
fi

summary=""
files=""
details=""
for spec in "$@"; do
    modules=${spec%%::*}
    tests=${spec#*::}
    patterns=()
    IFS=',' read -r -a parts <<< "$modules"
    for module in "${parts[@]}"; do
        if [ -d "$repo/$module" ]; then
            patterns+=("${module%/}/*.py")
        elif [ -f "$repo/$module" ]; then
            patterns+=("$module")
        else
            echo "no such module: $module" >&2
            exit 2
        fi
    done
    dir=$WORK/$(echo "$modules" | tr '/.,' '___')
    if [ "$RESUME" = "1" ] && [ -f "$dir/selected.txt" ]; then
        # an interrupted run: same copy, same selection, only the mutants without a result yet
        echo "== resuming $modules in $dir" >&2
        mapfile -t names < "$dir/selected.txt"
        if [ ${#names[@]} -eq 0 ] || [ -z "${names[0]}" ]; then names=(); fi
        (cd "$dir" && "$PYTHON" -m mutmut results --all true > results-before.txt 2>&1) || true
        mapfile -t todo < <(grep ": not checked$" "$dir/results-before.txt" | sed 's/:.*//; s/^ *//' |
            { if [ ${#names[@]} -gt 0 ]; then grep -x -F -f "$dir/selected.txt"; else cat; fi; } || true)
        if [ ${#todo[@]} -gt 0 ]; then
            (cd "$dir" && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PYTHON" -m mutmut run --max-children "$JOBS" \
                "${todo[@]}" >> mutmut-run.log 2>&1) || true
        fi
    else
        rm -rf "$dir" && mkdir -p "$dir"
        # the working tree as it is (tracked and untracked, not ignored files), without results
        (cd "$repo" && git ls-files -co --exclude-standard | grep -v '^bench/results/' | tar -cf - -T -) | tar -xf - -C "$dir"
        # the test selection: paths, then everything after -k as one expression
        paths=${tests%% -k *}
        {
            echo "[mutmut]"
            echo "source_paths=peft_fast"
            echo "only_mutate="
            for p in "${patterns[@]}"; do echo "    $p"; done
            # a loaded 2-core machine makes test times noisy: generous timeouts, so a timeout means a hang
            echo "timeout_multiplier=${TIMEOUT_MULTIPLIER:-10}"
            echo "timeout_constant=${TIMEOUT_CONSTANT:-10}"
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
        echo "== $modules ($tests) in $dir" >&2
        # which mutants: all of them (no names), a list, or a seeded sample stratified by file
        # (the sample needs the mutants' names, so generate them first, as `mutmut run` would)
        names=()
        if [ -n "$MUTANTS" ]; then
            mapfile -t names < <(grep -v '^ *$' "$MUTANTS")
        elif [ "$SAMPLE" != "1" ]; then
            (cd "$dir" && "$PYTHON" - "$SAMPLE" "$SEED" > generate.log 2>&1) <<'PY'
import math
import os
import random
import sys
from collections import defaultdict

from mutmut.__main__ import (
    SourceFileMutationData, copy_also_copy_files, copy_src_dir, create_mutants,
    set_mutant_under_test, setup_source_paths, walk_source_files,
)

fraction, seed = float(sys.argv[1]), int(sys.argv[2])
if not 0.0 < fraction <= 1.0:
    sys.exit(f"SAMPLE must be in (0, 1], got {fraction}")
set_mutant_under_test("mutant_generation")
os.makedirs("mutants", exist_ok=True)
copy_src_dir()
copy_also_copy_files()
setup_source_paths()
create_mutants(1)
by_file = defaultdict(list)
for path in walk_source_files():
    data = SourceFileMutationData(path=path)
    data.load()
    by_file[str(path)].extend(sorted(data.exit_code_by_key))
# one shuffle per file, seeded by (SEED, file): a larger SAMPLE with the same SEED runs a superset
with open("sample.txt", "w") as out:
    for path in sorted(by_file):
        keys = by_file[path]
        random.Random(f"{seed}:{path}").shuffle(keys)
        for key in sorted(keys[: math.ceil(fraction * len(keys))]):
            out.write(key + "\n")
PY
            mapfile -t names < "$dir/sample.txt"
            [ ${#names[@]} -gt 0 ] || { echo "no mutants sampled, see $dir/generate.log" >&2; exit 2; }
        fi
        printf '%s\n' "${names[@]}" > "$dir/selected.txt"
        # mutmut forks a warm test process per mutant: one thread per process, or torch's and
        # OpenMP's thread pools deadlock in the forked children
        (cd "$dir" && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PYTHON" -m mutmut run --max-children "$JOBS" \
            "${names[@]}" > mutmut-run.log 2>&1) || true
    fi
    (cd "$dir" && "$PYTHON" -m mutmut results --all true > results-all.txt 2>&1) || true
    if [ ${#names[@]} -gt 0 ]; then
        # only the selected mutants count; the others are "not checked" by design
        grep -F -f <(sed 's/^/ /; s/$/:/' "$dir/selected.txt") "$dir/results-all.txt" > "$dir/results.txt" || true
    else
        cp "$dir/results-all.txt" "$dir/results.txt"
    fi
    if [ "$FRESH" = "1" ]; then
        # survivors again, each in a fresh process (import-time mutants; see FRESH above)
        paths=${tests%% -k *}
        kexpr=()
        [ "$paths" = "$tests" ] || kexpr=(-k "${tests#* -k }")
        while read -r name; do
            rc=0
            # shellcheck disable=SC2086  # $paths: several pytest arguments
            (cd "$dir/mutants" && MUTANT_UNDER_TEST="$name" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
                timeout "$FRESH_TIMEOUT" "$PYTHON" -m pytest -x -q -p no:cacheprovider $paths "${kexpr[@]}" \
                > "$dir/fresh-$name.log" 2>&1) || rc=$?
            case $rc in
                1 | 2) verdict="killed (fresh)" ;;
                124) verdict="timeout (fresh)" ;;
                *) verdict="survived" ;;
            esac
            sed -i "s/^\( *$(printf '%s' "$name" | sed 's/[.[\*^$/]/\\&/g')\): survived\$/\1: $verdict/" "$dir/results.txt"
        done < <(grep -E ": survived$" "$dir/results.txt" | sed 's/:.*//; s/^ *//')
    fi
    count() { grep -c ": $1\$" "$dir/results.txt" || true; }
    killed=$(count killed); survived=$(count survived); timeout=$(count timeout)
    fresh=$(count "killed (fresh)"); timeout=$((timeout + $(count "timeout (fresh)")))
    suspicious=$(count suspicious); notests=$(count "no tests"); skipped=$(count skipped)
    unchecked=$(count "not checked")
    total=$((killed + fresh + survived + timeout + suspicious + notests + skipped + unchecked))
    scope="all"
    [ -z "$MUTANTS" ] || scope="listed ($(basename "$MUTANTS"))"
    [ -n "$MUTANTS" ] || [ "$SAMPLE" = "1" ] || scope="sample $SAMPLE, seed $SEED"
    summary+="| \`$modules\` | \`$tests\` | $scope | $total | $killed | $fresh | $timeout | $survived | $notests | $suspicious | $unchecked |"$'\n'
    # per file: mutants, killed (timeouts included), survived, no tests
    files+=$(sed -E 's/^ *//; s/\.(x_|xǁ).*: / /' "$dir/results.txt" | awk '
        { n[$1]++; if ($2 == "killed" || $2 == "timeout") k[$1]++; else if ($2 == "survived") s[$1]++; else if ($2 == "no") t[$1]++ }
        END { for (f in n) printf "| `%s` | %d | %d | %d | %d |\n", f, n[f], k[f], s[f], t[f] }' | sort)$'\n'
    details+=$'\n'"### $modules: surviving and untested mutants"$'\n\n'
    while read -r name; do
        details+='```diff'$'\n'"$(cd "$dir" && "$PYTHON" -m mutmut show "$name" 2>&1 | tail -n +1)"$'\n''```'$'\n'
    done < <(grep -E ": (survived|no tests)$" "$dir/results.txt" | sed 's/:.*//; s/^ *//')
done

report=$(cat <<EOF2
# Mutation testing (mutmut)

- date: $(date -u '+%Y-%m-%d %H:%M UTC')
- commit: $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet || echo " (with uncommitted changes)")
- versions: python $("$PYTHON" -c 'import platform; print(platform.python_version())'), mutmut $("$PYTHON" -c 'import importlib.metadata as m; print(m.version("mutmut"))'), torch $("$PYTHON" -c 'import torch; print(torch.__version__)')
- command: \`$( [ "$SAMPLE" = "1" ] || printf 'SAMPLE=%s SEED=%s ' "$SAMPLE" "$SEED")$( [ -z "$MUTANTS" ] || printf 'MUTANTS=%s ' "$(basename "$MUTANTS")")bench/mutation.sh$(printf ' "%s"' "$@")\`

Timeouts count as killed (the mutant hung the tests). "killed (fresh)": reported survived by mutmut,
killed when rerun in a fresh process (FRESH=1; import-time code, or a test outside mutmut's mapping).

| modules | tests | mutants run | mutants | killed | killed (fresh) | timeout | survived | no tests | suspicious | not checked |
|---|---|---|---|---|---|---|---|---|---|---|
$summary
| file | mutants | killed or timeout | survived | no tests |
|---|---|---|---|---|
$files
$details
EOF2
)
if [ "$REPORT" = "-" ]; then
    echo "$report"
else
    echo "$report" > "$REPORT"
    echo "report: $REPORT" >&2
fi
