#!/usr/bin/env bash
# benches/resync_rate.sh in two network namespaces joined by one replication veth pair whose
# egress on node a is capped with `tc tbf` (default 200 MB/s). Needs root, iproute2 (ip, tc).
# Usage: benches/resync_rate_netns.sh [CAP_MEGABYTES_PER_SEC]   (env as benches/resync_rate.sh,
#   and MTU of the veth pair, default 9001; RAW_BYTES, default 1 GiB: the size of the plain TCP
#   transfer measured first over the same capped link, the baseline the resync is compared with;
#   DIR_B, default /var/tmp: where node b's copy is made. Node a's copy is in /var/tmp. On one
#   machine both copies then share one disk, and node b's writes slow node a's reads; DIR_B=/dev/shm
#   gives node b a store of its own, as two instances have, and as benches/mirror_fio.sh's base
#   command does)
set -euo pipefail
CAP=${1:-200}
for t in ip tc; do command -v $t >/dev/null || { echo "$t missing: install iproute2" >&2; exit 1; }; done
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
id=$(( $$ % 200 ))
NA=trb${id}a NB=trb${id}b VA=trb${id}ra VB=trb${id}rb
IMG_B=${DIR_B:-/var/tmp}/trb$id-b.img
cleanup() {
  # shellcheck disable=SC2046 # one pid per word
  kill $(jobs -p) 2>/dev/null || true
  ip netns del $NA 2>/dev/null || true
  ip netns del $NB 2>/dev/null || true
  rm -f /var/tmp/trb$id-a.img "$IMG_B"
}
trap cleanup EXIT
cleanup
ip netns add $NA
ip netns add $NB
ip link add $VA type veth peer name $VB
ip link set $VA netns $NA
ip link set $VB netns $NB
ip -n $NA addr add 10.112.$id.1/24 dev $VA
ip -n $NB addr add 10.112.$id.2/24 dev $VB
for n in $NA $NB; do ip -n "$n" link set lo up; done
# 9001 bytes: the MTU of an ENI between EC2 instances of one VPC, as in mirror_fio_netns.sh.
# tbf charges every packet's headers against the cap, so at 1500 bytes plain TCP carries at
# most about 0.957 of it as payload, at 9001 about 0.993.
MTU=${MTU:-9001}
ip -n $NA link set $VA mtu "$MTU" up
ip -n $NB link set $VB mtu "$MTU" up
# tc's "mbit" is megabits per second; CAP is megabytes per second.
ip netns exec $NA tc qdisc add dev $VA root tbf rate $((CAP * 8))mbit burst 2mb latency 50ms
# The baseline: plain TCP (one socket, 4 MiB writes, the reader discarding) over the same link.
ip netns exec $NB python3 -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9999)); s.listen(1); c, _ = s.accept(); b = bytearray(1 << 20)
while c.recv_into(b): pass
c.close()' 10.112.$id.2 &
raw=$(ip netns exec $NA python3 -c '
import os, socket, sys, time
total = int(sys.argv[2]); buf = os.urandom(4 << 20); n = 0
for _ in range(50):  # the listener starts in the background
    try: s = socket.create_connection((sys.argv[1], 9999)); break
    except ConnectionRefusedError: time.sleep(0.1)
else: sys.exit("plain TCP baseline: no listener on %s:9999 after 5 s" % sys.argv[1])
t = time.time()
while n < total: s.sendall(buf); n += len(buf)
s.shutdown(socket.SHUT_WR); s.recv(1); print("%.1f" % (n / (time.time() - t) / 1e6))' \
  10.112.$id.2 "${RAW_BYTES:-1073741824}")
wait
echo "# plain TCP over the same link (MTU $MTU, cap $CAP MB/s): $raw MB/s of payload"
out=$(NS_A=$NA NS_B=$NB CAP_BYTES=$((CAP * 1000000)) "$here/resync_rate.sh" \
  /var/tmp/trb$id-a.img "$IMG_B" 10.112.$id.1:7789 10.112.$id.2:7789 $VA $VB)
echo "$out"
rate=$(sed -n 's/.* rate=\([0-9.]*\)MB\/s.*/\1/p' <<<"$out" | tail -1)
python3 -c 'import sys; print("resync / plain TCP over the same link: %.2f" % (float(sys.argv[1]) / float(sys.argv[2])))' "$rate" "$raw"
