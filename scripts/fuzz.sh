#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for a bounded time each.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     (default: 60 s, every target)
#
# Not part of the normal test command. Works on a stable toolchain: when
# rustc is not a nightly, RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z
# flags (sanitizer coverage, ASan). The corpus that libFuzzer grows is kept
# in the target directory ($CARGO_TARGET_DIR, else fuzz/target) under
# corpus/<target>, so later runs start where earlier ones stopped; the
# hand-written seeds in fuzz/corpus/<target>/ and the inputs kept in
# fuzz/regressions/<target>/ are read, never written. A crashing input is
# saved in fuzz/artifacts/<target>/. Exits non-zero if any target crashed,
# leaked, timed out or failed to build.
#
# Environment: FUZZ_SANITIZER (address, the default, or none: about twice as
# fast; postling itself forbids unsafe code) and FUZZ_ARGS (extra libFuzzer
# flags, e.g. "-fork=4" to use four cores, "-max_len=65536").
set -euo pipefail

seconds=${1:-60}
shift || true
case $seconds in
    '' | *[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz"
target_dir=${CARGO_TARGET_DIR:-$root/fuzz/target}
sanitizer=${FUZZ_SANITIZER:-address}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

fuzz=(--target-dir "$target_dir" --sanitizer "$sanitizer")
cargo fuzz build "${fuzz[@]}"

failed=()
for t in "${targets[@]}"; do
    work="$target_dir/corpus/$t"
    log="$target_dir/logs/$t.log"
    mkdir -p "$work" "$(dirname "$log")" "$root/fuzz/artifacts/$t"
    dirs=("$work" "$root/fuzz/corpus/$t")
    if [ -d "$root/fuzz/regressions/$t" ]; then
        dirs+=("$root/fuzz/regressions/$t")
    fi
    echo "fuzz: $t for ${seconds}s (log: $log)"
    # -timeout: one input taking 10 s is a hang, and a failure.
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
    if cargo fuzz run "${fuzz[@]}" "$t" "${dirs[@]}" -- \
        -max_total_time="$seconds" -timeout=10 \
        -print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1; then
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s += $2} END {print s + 0}')
        speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | awk '{s += $2} END {print s + 0}')
        cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | awk '{print $2}')
        echo "fuzz: $t ok: $runs runs, ${speed:-?} exec/s, coverage ${cov:-?}"
    else
        echo "fuzz: $t FAILED; the end of $log:" >&2
        tail -n 40 "$log" >&2
        failed+=("$t")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: failed: ${failed[*]} (crashing inputs are in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
echo "fuzz: all ${#targets[@]} targets ran ${seconds}s each without a crash"
