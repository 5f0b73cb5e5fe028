#!/usr/bin/env bash
# Builds every cargo-fuzz target under fuzz/ and runs each for a given time (docs/FUZZING.md).
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, all targets)
#
# Works on the stable toolchain: cargo-fuzz's -Z flags are accepted with RUSTC_BOOTSTRAP=1.
# Environment:
#   FUZZ_SANITIZER   address (default) | none. If the AddressSanitizer build fails, the script
#                    says so and falls back to none.
#   FUZZ_TARGET_DIR  build directory (default ~/.cache/twinvol-fuzz-target; the first build
#                    compiles the whole crate with the AWS SDK: 20-40 min on 2 cores).
#   FUZZ_ARGS        extra libFuzzer flags, e.g. "-max_len=65536" or "-fork=2".
# Corpora grow in fuzz/corpus/<target>/ (not committed), seeded from fuzz/seeds/. A crash or
# hang is saved in fuzz/artifacts/<target>/ and the script exits 1 after running the rest;
# reproduce with: cargo fuzz run <target> fuzz/artifacts/<target>/<file> (same env as below).
# Not part of scripts/test.sh: tests/fuzz_seeds.rs runs every seed through the same code in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
[[ "$secs" =~ ^[0-9]+$ ]] || { echo "usage: bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2; }

target_dir=${FUZZ_TARGET_DIR:-$HOME/.cache/twinvol-fuzz-target}
sanitizer=${FUZZ_SANITIZER:-address}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz from crates.io"
    cargo install cargo-fuzz --locked
fi

cd fuzz
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# Build flags: release with debug assertions and overflow checks (cargo-fuzz's default),
# 16 codegen units so the AWS SDK (linked, never run) does not take an hour.
build() { nice -n 10 cargo fuzz build --sanitizer "$1" --codegen-units 16 --target-dir "$target_dir"; }
echo "== building ${#targets[@]} targets (sanitizer: $sanitizer, dir: $target_dir)"
if ! build "$sanitizer"; then
    if [ "$sanitizer" = none ]; then
        echo "fuzz build failed" >&2
        exit 1
    fi
    echo "== the $sanitizer-sanitizer build failed; building without a sanitizer (FUZZ_SANITIZER=none)" >&2
    sanitizer=none
    build none
fi

seed_dirs() {
    case "$1" in
        nbd_stream) echo "seeds/nbd_stream seeds/nbd-client-streams" ;;
        repl_wire_decoder) echo "seeds/repl_wire_decoder seeds/repl-wire-frames" ;;
        *) echo "seeds/$1" ;;
    esac
}

mkdir -p logs
summary=()
failed=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    dirs=("corpus/$t")
    for d in $(seed_dirs "$t"); do [ -d "$d" ] && dirs+=("$d"); done
    echo "== $t: ${secs}s, corpora: ${dirs[*]}"
    status=ok
    # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: a leak or a bomb.
    # shellcheck disable=SC2086
    if ! nice -n 10 cargo fuzz run --sanitizer "$sanitizer" --codegen-units 16 --target-dir "$target_dir" \
        "$t" "${dirs[@]}" -- -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 \
        -print_final_stats=1 ${FUZZ_ARGS:-} >"logs/$t.log" 2>&1; then
        status="FAILED (see fuzz/logs/$t.log and fuzz/artifacts/$t/)"
        failed=1
    fi
    runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "logs/$t.log" | tail -1 | grep -oE '[0-9]+$' || echo "?")
    last=$(grep -E '^#[0-9]+' "logs/$t.log" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[^ ]+' || echo "cov: ?")
    summary+=("$(printf '%-18s %12s execs  %-40s %s' "$t" "$runs" "$last" "$status")")
done

echo
echo "== summary (${secs}s per target, sanitizer: $sanitizer)"
printf '%s\n' "${summary[@]}"
exit "$failed"
