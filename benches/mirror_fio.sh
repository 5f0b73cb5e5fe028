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
#      both: "4k-randwrite-qd32 1m-seqwrite-qd8"), MODES (default "sync async").
set -euo pipefail
A=$1 B=$2 ADDR_A=$3 ADDR_B=$4 RUNTIME=${5:-10}
TWINVOL=${TWINVOL:-target/release/twinvol}
SIZE=${SIZE:-1G}
LEVEL=${LEVEL:-1}
JOBS=${JOBS:-4k-randwrite-qd32 1m-seqwrite-qd8}
MODES=${MODES:-sync async}
W=$(mktemp -d /var/tmp/twinvol-bench-XXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; sleep 0.5; rm -rf "$W"' EXIT
command -v fio >/dev/null || { echo "fio missing: run scripts/test-deps.sh" >&2; exit 1; }
for d in "$A" "$B"; do [ -b "$d" ] || { rm -f "$d"; truncate -s "$SIZE" "$d"; }; done
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

jobs_run() { # label socket
  for job in "4k-randwrite-qd32:randwrite:4k:32" "1m-seqwrite-qd8:write:1M:8"; do
    IFS=: read -r name rw bs qd <<<"$job"
    [[ " $JOBS " == *" $name "* ]] || continue
    bw=$(fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$2" --rw="$rw" --bs="$bs" \
      --iodepth="$qd" --size=256M --time_based --runtime="$RUNTIME" --output-format=json \
      | python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]["write"]; print("%.1f MiB/s | %.0f IOPS" % (j["bw_bytes"]/1048576, j["iops"]))')
    echo "| $1 | $name | $bw |"
  done
}

mkmd() { for d in "$A" "$B"; do
  "$TWINVOL" create-md --device "$d" --force >/dev/null
  "$TWINVOL" new-current-uuid --clear-bitmap --uuid 5eed --device "$d" >/dev/null; done; }

echo "| setup | job | bandwidth | IOPS |"
echo "|---|---|---|---|"
mkmd
"$TWINVOL" export "$A" --socket "$W/plain.sock" --engine uring 2>"$W/plain.log" &
P=$!
sleep 1; jobs_run "no peer (twinvol export)" "$W/plain.sock"; kill $P; wait $P 2>/dev/null || true

for mode in $MODES; do
  mkmd
  conf a b "$A" "$ADDR_A" "$ADDR_B" "$mode"; conf b a "$B" "$ADDR_B" "$ADDR_A" "$mode"
  "$TWINVOL" mirror --config "$W/b.toml" --secondary --status-file "$W/b.json" 2>"$W/b.log" &
  PB=$!
  "$TWINVOL" mirror --config "$W/a.toml" --primary --status-file "$W/a.json" 2>"$W/a.log" &
  PA=$!
  for _ in $(seq 100); do grep -q '"connected"' "$W/a.json" 2>/dev/null && break; sleep 0.1; done
  jobs_run "$mode mirror" "$W/a.sock"
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
