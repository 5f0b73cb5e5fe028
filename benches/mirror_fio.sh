#!/usr/bin/env bash
# Replication benchmark (issue 4): fio through NBD against the same engine with no peer
# (`twinvol export`), a sync mirror and an async mirror. Ratios are what matters.
#
# Usage: benches/mirror_fio.sh DEV_A DEV_B ADDR_A ADDR_B [RUNTIME_SECS]
#   DEV_A/DEV_B: files or block devices (overwritten!), ADDR_A/ADDR_B: replication IP:port of
#   each node. On one machine: /var/tmp/a.img /var/tmp/b.img 127.0.0.1:7789 127.0.0.2:7790.
#   On two EC2 instances run node b by hand with the printed config and give its address.
# Env: TWINVOL (binary, default target/release/twinvol), SIZE (file size, default 1G),
#      LEVEL (zstd level on the wire, default 1; 0 = off), JOBS (job names to run, default
#      both: "4k-randwrite-qd32 1m-seqwrite-qd8"), MODES (default "sync async"),
#      ROUNDS (default 1): repeat no-peer + each mode this many times, alternating, and print
#      every round's ratios and their medians (a machine whose disk or CPU drifts between runs
#      then still compares each mirror run with a no-peer run taken next to it).
set -euo pipefail
A=$1 B=$2 ADDR_A=$3 ADDR_B=$4 RUNTIME=${5:-10}
TWINVOL=${TWINVOL:-target/release/twinvol}
SIZE=${SIZE:-1G}
LEVEL=${LEVEL:-1}
JOBS=${JOBS:-4k-randwrite-qd32 1m-seqwrite-qd8}
MODES=${MODES:-sync async}
ROUNDS=${ROUNDS:-1}
W=$(mktemp -d /var/tmp/twinvol-bench-XXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; sleep 0.5; rm -rf "$W"' EXIT
command -v fio >/dev/null || { echo "fio missing: run scripts/test-deps.sh" >&2; exit 1; }
for d in "$A" "$B"; do [ -b "$d" ] || { rm -f "$d"; truncate -s "$SIZE" "$d"; }; done
# Write the region the jobs use once before any is measured: the first write into a sparse
# file (or a fresh EBS volume) allocates and is several times slower than the next one, and
# whichever setup ran first would pay for it.
for d in "$A" "$B"; do
  dd if=/dev/zero of="$d" bs=1M count=256 oflag=direct conv=notrunc status=none
done
head -c 32 /dev/urandom >"$W/key"; chmod 600 "$W/key"

conf() { # name peer dev addr peer_addr mode
  cat >"$W/$1.toml" <<EOF
[node]
id = "$1"
[[volume]]
name = "bench"
device = "$3"
engine = "uring"
[volume.export]
socket = "$W/$1.sock"
[volume.replication]
address = "$4"
peer = "$5"
peer_id = "$2"
key_file = "$W/key"
mode = "$6"
compression_level = $LEVEL
EOF
}

jobs_run() { # label socket round
  for job in "4k-randwrite-qd32:randwrite:4k:32" "1m-seqwrite-qd8:write:1M:8"; do
    IFS=: read -r name rw bs qd <<<"$job"
    [[ " $JOBS " == *" $name "* ]] || continue
    bw=$(fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$2" --rw="$rw" --bs="$bs" \
      --iodepth="$qd" --size=256M --time_based --runtime="$RUNTIME" --output-format=json \
      | python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]["write"]; print("%.1f MiB/s | %.0f IOPS" % (j["bw_bytes"]/1048576, j["iops"]))')
    echo "| $1 | $name | $bw |"
    echo "$3|$1|$name|${bw%% MiB/s*}" >>"$W/results"
  done
}

mkmd() { for d in "$A" "$B"; do
  "$TWINVOL" create-md --device "$d" --force >/dev/null
  "$TWINVOL" new-current-uuid --clear-bitmap --uuid 5eed --device "$d" >/dev/null; done; }

echo "| setup | job | bandwidth | IOPS |"
echo "|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
mkmd
"$TWINVOL" export "$A" --socket "$W/plain.sock" --engine uring 2>"$W/plain.log" &
P=$!
sleep 1; jobs_run "no peer (twinvol export)" "$W/plain.sock" "$round"; kill $P; wait $P 2>/dev/null || true

for mode in $MODES; do
  mkmd
  conf a b "$A" "$ADDR_A" "$ADDR_B" "$mode"; conf b a "$B" "$ADDR_B" "$ADDR_A" "$mode"
  "$TWINVOL" mirror --config "$W/b.toml" --secondary --status-file "$W/b.json" 2>"$W/b.log" &
  PB=$!
  "$TWINVOL" mirror --config "$W/a.toml" --primary --status-file "$W/a.json" 2>"$W/a.log" &
  PA=$!
  for _ in $(seq 100); do grep -q '"connected"' "$W/a.json" 2>/dev/null && break; sleep 0.1; done
  jobs_run "$mode mirror" "$W/a.sock" "$round"
  for _ in $(seq 600); do grep -q '"rpo_bytes": 0' "$W/a.json" && break; sleep 0.1; done
  python3 - "$W/a.json" "$mode" <<'PY' || true
import json, sys
c = json.load(open(sys.argv[1]))["counters"]
print("# %s: Data bytes sent %d, went ahead %d times (then resynced %d bytes), wire/payload %.3f"
      % (sys.argv[2], c["data_bytes_sent"], c["ahead_events"], c["resync_bytes_sent"],
         c["wire_bytes_sent"] / max(1, c["payload_bytes_sent"])))
PY
  kill $PA $PB; wait $PA $PB 2>/dev/null || true
done
done

# Each mirror figure against the no-peer figure of its own round, then the median per row.
python3 - "$W/results" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("|") for l in open(sys.argv[1])]
base = {(r, job): float(bw) for r, label, job, bw in rows if label.startswith("no peer")}
ratios = {}
for r, label, job, bw in rows:
    if not label.startswith("no peer"):
        ratios.setdefault((label, job), []).append(float(bw) / base[(r, job)])
print()
print("| mirror vs no peer | job | ratio per round | median |")
print("|---|---|---|---|")
for (label, job), rs in ratios.items():
    print("| %s | %s | %s | **%.2fx** |" % (label, job, ", ".join("%.2fx" % x for x in rs),
                                           statistics.median(rs)))
PY
