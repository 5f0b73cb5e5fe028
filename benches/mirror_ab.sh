#!/usr/bin/env bash
# A/B of two twinvol binaries on the replication benchmark: benches/mirror_fio.sh runs once per
# binary per pair (ROUNDS=1: its no-peer run and each mode), the binaries alternating and
# swapping places every pair, so that neither always runs first or on the same phase of a
# drifting disk. A change is worth keeping when its figures beat the other binary's across the
# pairs, not in one run: on the machine of docs/BENCHMARKS.md one binary's sync 1 MiB ratio
# spans 0.58-0.81x over four rounds.
#
# Usage: benches/mirror_ab.sh BIN_A BIN_B DEV_A DEV_B ADDR_A ADDR_B [RUNTIME_SECS]
#   BIN_A/BIN_B: two twinvol binaries (copy each build aside: cargo overwrites its target),
#   the rest as for benches/mirror_fio.sh.
# Env: PAIRS (default 3); JOBS (default 1m-seqwrite-qd8), MODES (default sync), CPUS_A, CPUS_B,
#      LEVEL, SIZE, RUN_B, WORK_PARENT, SETTLE_SECS: passed to benches/mirror_fio.sh.
#      OUT (default: a new directory under /tmp): where each run's full output is kept.
# Prints each run's rows, then per binary, setup and job: the bandwidth, the ratio to the
# no-peer run of the same invocation, and node a's and node b's CPU per GiB, per pair and as
# medians.
set -euo pipefail
[ $# -ge 6 ] || { sed -n '9,16p' "$0" >&2; exit 2; }
BIN_A=$1 BIN_B=$2
shift 2
HERE=$(cd "$(dirname "$0")" && pwd)
PAIRS=${PAIRS:-3}
OUT=${OUT:-$(mktemp -d /tmp/mirror-ab.XXXXXX)}
mkdir -p "$OUT"
for b in "$BIN_A" "$BIN_B"; do
  [ -x "$b" ] || { echo "no twinvol binary at $b" >&2; exit 1; }
done
[ "$BIN_A" != "$BIN_B" ] || { echo "BIN_A and BIN_B are the same file: nothing to compare" >&2; exit 1; }
echo "# A = $BIN_A ($("$BIN_A" --version), built $(date -r "$BIN_A" -u +%FT%TZ))"
echo "# B = $BIN_B ($("$BIN_B" --version), built $(date -r "$BIN_B" -u +%FT%TZ))"
echo "# $PAIRS pairs, runs kept in $OUT"
: >"$OUT/rows"
for pair in $(seq "$PAIRS"); do
  order="A B"
  [ $((pair % 2)) -eq 1 ] || order="B A"
  for v in $order; do
    bin=$BIN_A
    [ "$v" = A ] || bin=$BIN_B
    log="$OUT/pair$pair-$v.txt" results="$OUT/pair$pair-$v.results"
    # The binaries are not the checkout's build by design; mirror_fio.sh's staleness check
    # would refuse them.
    if ! ALLOW_STALE=1 ROUNDS=1 JOBS="${JOBS:-1m-seqwrite-qd8}" MODES="${MODES:-sync}" \
      TWINVOL="$bin" RESULTS="$results" bash "$HERE/mirror_fio.sh" "$@" >"$log" 2>&1; then
      echo "pair $pair, binary $v failed; its output:" >&2
      tail -30 "$log" >&2
      exit 1
    fi
    grep -E '^\| (no peer[^|]*|sync mirror|async mirror) \| [^|]+ \| [0-9.]+ MiB/s' "$log" | sed "s/^/$pair $v /"
    sed "s/^/$pair|$v|/" "$results" >>"$OUT/rows"
  done
done
python3 - "$OUT/rows" <<'PY'
import statistics, sys
# Records: "<pair>|<A or B>|" and mirror_fio.sh's RESULTS record (round|setup|job|MiB/s|node a
# s/GiB|node b s/GiB).
runs = {}
for line in open(sys.argv[1]):
    pair, v, _, setup, job, bw, ca, cb = line.rstrip("\n").split("|")
    runs.setdefault((pair, v), {})[(setup, job)] = (float(bw), ca, cb)
table = {}
for (pair, v), rows in runs.items():
    for (setup, job), (bw, ca, cb) in rows.items():
        if setup.startswith("no peer"):
            continue
        base = next((b for (s, j), (b, _, _) in rows.items() if s.startswith("no peer") and j == job), None)
        ratio = bw / base if base else float("nan")
        table.setdefault((setup, job, v), []).append((bw, ratio, ca, cb))

def med(xs):
    xs = [float(x) for x in xs if x not in ("-", "")]
    return statistics.median(xs) if xs else float("nan")

print()
print("| setup | job | binary | MiB/s per pair | ratio to no peer per pair | median ratio | node a s/GiB, median | node b s/GiB, median |")
print("|---|---|---|---|---|---|---|---|")
for (setup, job, v) in sorted(table):
    t = table[(setup, job, v)]
    print("| %s | %s | %s | %s | %s | **%.2fx** | %.3f | %.3f |" % (
        setup, job, v, ", ".join("%.0f" % r[0] for r in t), ", ".join("%.2f" % r[1] for r in t),
        med(r[1] for r in t), med(r[2] for r in t), med(r[3] for r in t)))
PY
