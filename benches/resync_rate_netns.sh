#!/usr/bin/env bash
# benches/resync_rate.sh in two network namespaces joined by one replication veth pair whose
# egress on node a is capped with `tc tbf` (default 200 MB/s). Needs root, iproute2 (ip, tc).
# Usage: benches/resync_rate_netns.sh [CAP_MEGABYTES_PER_SEC]   (env as benches/resync_rate.sh)
set -euo pipefail
CAP=${1:-200}
for t in ip tc; do command -v $t >/dev/null || { echo "$t missing: install iproute2" >&2; exit 1; }; done
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
id=$(( $$ % 200 ))
NA=trb${id}a NB=trb${id}b VA=trb${id}ra VB=trb${id}rb
cleanup() {
  ip netns del $NA 2>/dev/null || true
  ip netns del $NB 2>/dev/null || true
  rm -f /var/tmp/trb$id-a.img /var/tmp/trb$id-b.img
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
for n in $NA $NB; do ip -n $n link set lo up; done
ip -n $NA link set $VA up
ip -n $NB link set $VB up
# tc's "mbit" is megabits per second; CAP is megabytes per second.
ip netns exec $NA tc qdisc add dev $VA root tbf rate $((CAP * 8))mbit burst 2mb latency 50ms
NS_A=$NA NS_B=$NB CAP_BYTES=$((CAP * 1000000)) "$here/resync_rate.sh" \
  /var/tmp/trb$id-a.img /var/tmp/trb$id-b.img 10.112.$id.1:7789 10.112.$id.2:7789 $VA $VB
