#!/usr/bin/env bash
# Resync benchmark: a full resync of DEV_A onto DEV_B (fresh metadata on both, so the
# connect decision is a full initial sync from the Primary, promoted with --force), timed from the connection to the
# end of the resync, with the resync payload and (when the interface is given) the bytes that
# left node a's replication interface.
#
# Usage: benches/resync_rate.sh DEV_A DEV_B ADDR_A ADDR_B [IFACE_A IFACE_B]
#   DEV_A/DEV_B: files or block devices (overwritten!). ADDR_A/ADDR_B: replication IP:port of
#   each node. IFACE_A/IFACE_B: replication interfaces (SO_BINDTODEVICE; IFACE_A's tx_bytes
#   gives the wire bytes). Node a (the resync source) runs here; DEV_B and IFACE_B are node b's.
#   Two machines: RUN_B="ssh ec2-user@10.0.1.20 sudo" TWINVOL_B=/usr/local/bin/twinvol \
#     benches/resync_rate.sh /dev/nvme1n1 /dev/nvme1n1 10.0.1.10:7789 10.0.1.20:7789 ens6 ens6
# Env: TWINVOL (binary, default target/release/twinvol), SIZE (file size, default 1G),
#      DATA (random | text: JSON-like lines, compressible; default random), LEVEL (zstd level,
#      default 1), RATE_MAX (resync_rate_max bytes/s, default 4 GiB/s so the link is the limit),
#      CAP_BYTES (link cap in bytes/s, to print the fraction reached), NS_A/NS_B (run each node
#      inside this network namespace: `ip netns exec`), RUN_B and TWINVOL_B (node b on another
#      host: see benches/node_b.sh; NS_B is RUN_B="ip netns exec NS_B sh -c"),
#      ALLOW_STALE=1: measure a binary older than the checkout's sources (refused otherwise),
#      WORK_PARENT (default /dev/shm): where the work directory is made, as in
#      benches/mirror_fio.sh.
set -euo pipefail
A=$1 B=$2 ADDR_A=$3 ADDR_B=$4 IFACE_A=${5:-} IFACE_B=${6:-}
TWINVOL=${TWINVOL:-target/release/twinvol}
TWINVOL_B=${TWINVOL_B:-$TWINVOL}
RUN_B=${RUN_B:-}
if [ -z "$RUN_B" ] && [ -n "${NS_B:-}" ]; then RUN_B="ip netns exec $NS_B sh -c"; fi
SIZE=${SIZE:-1G}
DATA=${DATA:-random}
LEVEL=${LEVEL:-1}
RATE_MAX=${RATE_MAX:-4294967296}
. "$(dirname "$0")/binary.sh"
check_binary "$TWINVOL"
# On tmpfs, like /run on a node: see benches/mirror_fio.sh.
W=$(mktemp -d "${WORK_PARENT:-/dev/shm}/twinvol-resync-XXXX")
. "$(dirname "$0")/node_b.sh"
trap 'kill $(jobs -p) 2>/dev/null; cleanup_b; sleep 0.5; rm -rf "$W"' EXIT
# Runs a command in namespace $1 (or here when empty); exec so that `kill $(jobs -p)` reaches it.
inns() { local ns=$1; shift; if [ -n "$ns" ]; then exec ip netns exec "$ns" "$@"; else exec "$@"; fi; }
sized "$A" "$SIZE"
sized_b "$B" "$SIZE"
head -c 32 /dev/urandom >"$W/key"; chmod 600 "$W/key"
put_b "$W/key" "$WB/key"

# Fill A (create-md then writes the metadata at the tail).
bytes=$(python3 - "$A" "$DATA" <<'PY'
import os, sys, json, random
path, kind = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_WRONLY)
size = os.lseek(fd, 0, os.SEEK_END); os.lseek(fd, 0, os.SEEK_SET)
rng = random.Random(42)
words = ["status", "ok", "volume", "replication", "primary", "secondary", "bytes", "latency"]
done = 0
while done < size:
    n = min(8 << 20, size - done)
    if kind == "text":
        out, l = [], 0
        while l < n:
            s = json.dumps({"id": rng.randrange(10**9), "node": rng.choice(words),
                            "event": rng.choice(words), "value": round(rng.random() * 1000, 3),
                            "ts": 1700000000 + rng.randrange(10**6)}) + "\n"
            out.append(s); l += len(s)
        buf = "".join(out).encode()[:n]
    else:
        buf = os.urandom(n)
    os.write(fd, buf); done += n
os.close(fd)
print(size)
PY
)
"$TWINVOL" create-md --device "$A" --force >/dev/null
on_b "$TWINVOL_B" create-md --device "$B" --force >/dev/null

conf() { # name peer dev addr peer_addr iface dir
  {
    printf '[node]\nid = "%s"\n[[volume]]\nname = "bench"\ndevice = "%s"\nengine = "sync"\n' "$1" "$3"
    printf '[volume.export]\nsocket = "%s"\n' "$7/$1.sock"
    printf '[volume.replication]\naddress = "%s"\npeer = "%s"\npeer_id = "%s"\nkey_file = "%s"\n' "$4" "$5" "$2" "$7/key"
    printf 'compression_level = %s\nresync_rate_max = %s\n' "$LEVEL" "$RATE_MAX"
    [ -z "$6" ] || printf 'interface = "%s"\n' "$6"
  } >"$W/$1.toml"
}
conf a b "$A" "$ADDR_A" "$ADDR_B" "$IFACE_A" "$W"
conf b a "$B" "$ADDR_B" "$ADDR_A" "$IFACE_B" "$WB"
put_b "$W/b.toml" "$WB/b.toml"
txb() { if [ -n "$IFACE_A" ]; then (inns "${NS_A:-}" cat "/sys/class/net/$IFACE_A/statistics/tx_bytes"); else echo 0; fi; }
tx0=$(txb)
start_b "$WB/b.toml" "$WB/b.log"
(inns "${NS_A:-}" "$TWINVOL" mirror --config "$W/a.toml" --primary --force --status-file "$W/a.json" 2>"$W/a.log") &
for _ in $(seq 1000); do grep -q '"connected"' "$W/a.json" 2>/dev/null && break; sleep 0.02; done
t0=$(date +%s.%N)
in_sync() { local f; f=$(cat "$W/a.json" 2>/dev/null) || return 1
  grep -q '"state": "connected"' <<<"$f" && grep -q '"resync": null' <<<"$f" && grep -q '"rpo_bytes": 0,' <<<"$f"; }
for _ in $(seq 72000); do in_sync && break; sleep 0.02; done
t1=$(date +%s.%N)
tx1=$(txb)
python3 - "$W/a.json" "$t0" "$t1" "$tx0" "$tx1" "$bytes" "${CAP_BYTES:-0}" "$DATA" "$LEVEL" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
t0, t1 = float(sys.argv[2]), float(sys.argv[3])
tx0, tx1, size, cap = (int(x) for x in sys.argv[4:8])
sent = s["counters"]["resync_bytes_sent"]
secs = t1 - t0
rate = sent / secs
out = f"data={sys.argv[8]} zstd_level={sys.argv[9]} file={size} resync_bytes_sent={sent} seconds={secs:.2f} rate={rate/1e6:.1f}MB/s"
if cap:
    out += f" cap={cap/1e6:.0f}MB/s fraction_of_cap={rate/cap:.2f}"
if tx1 > tx0:
    wire = tx1 - tx0
    out += f" wire_bytes={wire} wire/payload={wire/sent:.3f} wire_rate={wire/secs/1e6:.1f}MB/s"
print(out)
PY
