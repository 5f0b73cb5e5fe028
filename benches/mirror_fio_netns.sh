#!/usr/bin/env bash
# benches/mirror_fio.sh with node b in a network namespace of its own, joined to this one by a
# replication veth pair: node b runs through the same RUN_B command prefix that runs it on a
# second EC2 instance over ssh, so this is that path, exercised on one machine. Both nodes
# still share this machine's CPUs. Needs root and iproute2.
# Usage: benches/mirror_fio_netns.sh DEV_A DEV_B [RUNTIME_SECS]   (env as benches/mirror_fio.sh,
#   and MTU of the veth pair, default 9001)
set -euo pipefail
A=$1 B=$2 RUNTIME=${3:-10}
command -v ip >/dev/null || { echo "ip missing: install iproute2" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
id=$(($$ % 200))
NB=tmf${id}b VA=tmf${id}ra VB=tmf${id}rb
cleanup() {
  ip link del $VA 2>/dev/null || true
  ip netns del $NB 2>/dev/null || true
}
trap cleanup EXIT
cleanup
ip netns add $NB
ip link add $VA type veth peer name $VB
ip link set $VB netns $NB
ip addr add 10.113.$id.1/24 dev $VA
ip -n $NB addr add 10.113.$id.2/24 dev $VB
# 9001 bytes: the MTU of an ENI between EC2 instances of one VPC (veth's default is 1500).
MTU=${MTU:-9001}
ip link set $VA mtu $MTU
ip -n $NB link set $VB mtu $MTU
ip link set $VA up
ip -n $NB link set lo up
ip -n $NB link set $VB up
tx0=$(cat /sys/class/net/$VA/statistics/tx_bytes)
RUN_B="ip netns exec $NB sh -c" "$here/mirror_fio.sh" "$A" "$B" \
  10.113.$id.1:7789 10.113.$id.2:7789 "$RUNTIME"
echo "# replication veth $VA sent $(($(cat /sys/class/net/$VA/statistics/tx_bytes) - tx0)) bytes"
