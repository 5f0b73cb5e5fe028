#!/usr/bin/env bash
# Replication benchmark: fio through NBD against the same engine with no peer
# (`twinvol export`), a sync mirror and an async mirror. Ratios are what matters.
#
# Usage: benches/mirror_fio.sh DEV_A DEV_B ADDR_A ADDR_B [RUNTIME_SECS]
#   DEV_A/DEV_B: files or block devices (overwritten!), ADDR_A/ADDR_B: replication IP:port of
#   each node. Node a (the Primary, with fio) runs here; DEV_B is a path on node b.
#   One machine: /var/tmp/a.img /var/tmp/b.img 127.0.0.1:7789 127.0.0.2:7790. To give node b a
#   store of its own, put DEV_B in RAM: on a tmpfs mounted with huge=always its writes cost
#   node b a third less CPU than on /dev/shm (docs/BENCHMARKS.md).
#   Two machines (e.g. EC2 instances with an EBS volume and a replication ENI each):
#     RUN_B="ssh ec2-user@10.0.1.20 sudo" TWINVOL_B=/usr/local/bin/twinvol \
#       benches/mirror_fio.sh /dev/nvme1n1 /dev/nvme1n1 10.0.1.10:7789 10.0.1.20:7789 30
#   RUN_B is a command prefix to which one argument, a shell command line, is appended, and
#   which runs that line on node b with stdin passed through: "ssh HOST [sudo]", or
#   "ip netns exec NS sh -c" (benches/mirror_fio_netns.sh runs node b in a namespace so).
# Env: TWINVOL (binary, default target/release/twinvol), TWINVOL_B (binary on node b, default
#      TWINVOL), RUN_B (default: node b runs here), SIZE (file size, default 1G),
#      LEVEL (zstd level on the wire, default 1; 0 = off), JOBS (job names to run, default
#      both: "4k-randwrite-qd32 1m-seqwrite-qd8"), MODES (default "sync async"),
#      ROUNDS (default 1): repeat no-peer + each mode this many times, alternating (each round
#      starts one setup further along, so none always runs first or after the same job), and
#      print every round's ratios and their medians (a machine whose disk or CPU drifts
#      between runs then still compares each mirror run with a no-peer run taken next to it),
#      ALLOW_STALE=1: measure a binary older than the checkout's sources (refused otherwise),
#      CPUS_A / CPUS_B (default unset: no pinning): taskset CPU lists for node a with fio, and
#      for node b. On one machine "CPUS_A=0 CPUS_B=1" gives each node a core of its own, as two
#      instances would have, instead of fio and both nodes sharing every core; the no-peer run
#      gets CPUS_A too, so each ratio compares like with like.
#      BW_LOG_DIR (default unset): keep fio's bandwidth every 500 ms there, one file per round,
#      setup and job (r<round>-<setup>-<job>_bw.1.log: ms, KiB/s, ...), to tell a uniformly
#      slower run from one with stalls.
#      WORK_PARENT (default /dev/shm): where the work directory is made; keep it off DEV_A's
#      file system (see below).
#      SETTLE_SECS (default 0): idle seconds before every job, so that no job runs in the wake
#      of the one before it (see docs/BENCHMARKS.md).
#      RESULTS (default unset): a file to which each row is also appended as a record for
#      programs, "round|setup|job|MiB/s|node a CPU s/GiB|node b CPU s/GiB" (benches/mirror_ab.sh).
# Each row also shows DEV_A's block device over the job (all its writers): the milliseconds a
# write spent in the device and the size of a write as the device saw it; and this machine's
# CPUs over the job: the share idle and the share stolen by the hypervisor.
set -euo pipefail
A=$1 B=$2 ADDR_A=$3 ADDR_B=$4 RUNTIME=${5:-10}
TWINVOL=${TWINVOL:-target/release/twinvol}
TWINVOL_B=${TWINVOL_B:-$TWINVOL}
RUN_B=${RUN_B:-}
SIZE=${SIZE:-1G}
LEVEL=${LEVEL:-1}
JOBS=${JOBS:-4k-randwrite-qd32 1m-seqwrite-qd8}
MODES=${MODES:-sync async}
ROUNDS=${ROUNDS:-1}
CPUS_A=${CPUS_A:-}
CPUS_B=${CPUS_B:-}
BW_LOG_DIR=${BW_LOG_DIR:-}
SETTLE_SECS=${SETTLE_SECS:-0}
WORK_PARENT=${WORK_PARENT:-/dev/shm}
# A prefix that runs a command on CPUS_A when it is set (an array, not a function: a command
# started in the background with it keeps its pid, which the script kills).
PIN_A=()
[ -z "$CPUS_A" ] || PIN_A=(taskset -c "$CPUS_A")
command -v fio >/dev/null || { echo "fio missing: run scripts/test-deps.sh" >&2; exit 1; }
. "$(dirname "$0")/binary.sh"
bin_line=$(check_binary "$TWINVOL")
# The work directory (node a's status file, rewritten every 100 ms, logs, sockets) is on tmpfs,
# as /run is on a real node: on the file system of DEV_A the status file's renames waited for
# journal commits that held DEV_A's writes too (0.25-0.4 s with no write completing, measured),
# a cost the no-peer run, which writes no status file, did not pay.
W=$(mktemp -d "$WORK_PARENT/twinvol-bench-XXXX")
. "$(dirname "$0")/node_b.sh"
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  cleanup_b
  sleep 0.5
  rm -rf "$W"
}
trap cleanup EXIT
sized "$A" "$SIZE"
sized_b "$B" "$SIZE"
# Write the region the jobs use once before any is measured: the first write into a sparse
# file (or a fresh EBS volume) allocates and is several times slower than the next one, and
# whichever setup ran first would pay for it.
dd if=/dev/zero of="$A" bs=1M count=256 oflag=direct conv=notrunc status=none
on_b dd if=/dev/zero of="$B" bs=1M count=256 oflag=direct conv=notrunc status=none
head -c 32 /dev/urandom >"$W/key"; chmod 600 "$W/key"
put_b "$W/key" "$WB/key"
echo "$bin_line; node b: ${RUN_B:-this machine}"
echo "# CPUs: node a and fio ${CPUS_A:-any}, node b ${CPUS_B:-any} (of $(nproc) here)"

conf() { # name peer dev addr peer_addr mode dir
  cat >"$W/$1.toml" <<EOF
[node]
id = "$1"
[[volume]]
name = "bench"
device = "$3"
engine = "uring"
[volume.export]
socket = "$7/$1.sock"
[volume.replication]
address = "$4"
peer = "$5"
peer_id = "$2"
key_file = "$7/key"
mode = "$6"
compression_level = $LEVEL
EOF
}

# cpu_s PID / cpu_s_b PID: CPU seconds (user + system, every thread's, io_uring workers
# included) the process has used so far, here or on node b.
CPU_SH='t=$(getconf CLK_TCK); sed "s/.*) //" "/proc/$1/stat" | awk -v t="$t" "{printf \"%.2f\", (\$12 + \$13) / t}"'
cpu_s() { sh -c "$CPU_SH" sh "$1"; }
# The block device holding DEV_A (itself, or the one under its file system), for its
# /sys/class/block/<dev>/stat: fields 5, 7 and 8 are writes completed, sectors written and
# milliseconds the writes spent in the device. Empty when there is none (tmpfs, overlay).
DEV_STAT=
dev_a_src=$A
[ -b "$A" ] || dev_a_src=$(df --output=source "$A" 2>/dev/null | tail -1)
if [ -n "$dev_a_src" ] && [ -e "$dev_a_src" ]; then
  f=/sys/class/block/$(basename "$(readlink -f "$dev_a_src")")/stat
  [ -r "$f" ] && DEV_STAT=$f
fi
dev_w() { if [ -n "$DEV_STAT" ]; then awk '{print $5, $7, $8}' "$DEV_STAT"; else echo "- - -"; fi; }
cpu_s_b() { on_b sh -c "$CPU_SH" sh "$1"; }
# This machine's CPU time so far, from /proc/stat's "cpu" line: total, idle (with iowait),
# steal (in clock ticks).
cpu_stat() { awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8+$9, $5+$6, $9}' /proc/stat; }

jobs_run() { # label socket round twinvol-pid(node a) twinvol-pid(node b, or "")
  for job in "4k-randwrite-qd32:randwrite:4k:32" "1m-seqwrite-qd8:write:1M:8"; do
    IFS=: read -r name rw bs qd <<<"$job"
    [[ " $JOBS " == *" $name "* ]] || continue
    [ "$SETTLE_SECS" = 0 ] || sleep "$SETTLE_SECS"
    local bwlog=()
    if [ -n "$BW_LOG_DIR" ]; then
      mkdir -p "$BW_LOG_DIR"
      bwlog=(--write_bw_log="$BW_LOG_DIR/r$3-${1//[^a-z0-9]/_}-$name" --log_avg_msec=500)
    fi
    local a0 b0=- a1 b1=- d0 d1 t0 t1
    d0=$(dev_w)
    t0=$(cpu_stat)
    a0=$(cpu_s "$4")
    [ -z "$5" ] || b0=$(cpu_s_b "$5")
    # fio's JSON: bandwidth, IOPS, bytes written and fio's own CPU seconds (its usr/sys
    # percentages are of the job's runtime).
    read -r mib iops bytes fio_s < <("${PIN_A[@]}" fio --name="$name" --ioengine=nbd --uri="nbd+unix:///?socket=$2" --rw="$rw" --bs="$bs" \
      --iodepth="$qd" --size=256M --time_based --runtime="$RUNTIME" --output-format=json "${bwlog[@]}" \
      | python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; w=j["write"]; print("%.1f %.0f %d %.2f" % (w["bw_bytes"]/1048576, w["iops"], w["io_bytes"], (j["usr_cpu"]+j["sys_cpu"])/100*j["job_runtime"]/1000))')
    a1=$(cpu_s "$4")
    t1=$(cpu_stat)
    d1=$(dev_w)
    [ -z "$5" ] || b1=$(cpu_s_b "$5")
    # The row's derived columns, from the readings before and after the job.
    read -r cpu_a cpu_b dev_ms dev_kib idle_pct steal_pct < <(python3 - "$a0" "$a1" "$fio_s" "$bytes" "$b0" "$b1" "$d0" "$d1" "$t0" "$t1" <<'PY'
import sys
a0, a1, fio_s, n, b0, b1, d0, d1, t0, t1 = sys.argv[1:]
# CPU seconds per GiB written: node a's core (twinvol and fio) and node b (twinvol).
# ("-" where there is nothing to divide: no node b, or no byte written.)
g = int(n) / 2**30
out = ["-" if not g else "%.3f" % ((float(a1) - float(a0) + float(fio_s)) / g),
       "-" if b0 == "-" or not g else "%.3f" % ((float(b1) - float(b0)) / g)]
# DEV_A's device over the job (every writer on it): milliseconds each write spent in the
# device, and its size (a 1 MiB write split by the block layer shows as ~512 KiB). A slower
# device at the same queue depth shows here, not in twinvol's CPU figures.
w, sec, ms = (0, 0, 0) if "-" in d0 else (int(y) - int(x) for x, y in zip(d0.split(), d1.split()))
out += ["%.2f" % (ms / w), "%.0f" % (sec * 512 / 1024 / w)] if w else ["-", "-"]
# This machine's CPUs over the job: the share idle, and the share the hypervisor gave to
# others while a CPU here wanted to run (steal; it varied from 0 to 16% between runs of the
# same job on the development VM, see docs/BENCHMARKS.md).
d = [int(y) - int(x) for x, y in zip(t0.split(), t1.split())]
out += ["%.0f" % (100 * d[1] / d[0]), "%.0f" % (100 * d[2] / d[0])] if d[0] else ["-", "-"]
print(*out)
PY
    )
    echo "| $1 | $name | $mib MiB/s | $iops IOPS | $cpu_a | $cpu_b | $dev_ms | $dev_kib | $idle_pct | $steal_pct |"
    local record="$3|$1|$name|$mib|$cpu_a|$cpu_b"
    echo "$record" >>"$W/results"
    [ -z "${RESULTS:-}" ] || echo "$record" >>"$RESULTS"
  done
}

mkmd() {
  "$TWINVOL" create-md --device "$A" --force >/dev/null
  "$TWINVOL" new-current-uuid --clear-bitmap --uuid 5eed --device "$A" >/dev/null
  on_b "$TWINVOL_B" create-md --device "$B" --force >/dev/null
  on_b "$TWINVOL_B" new-current-uuid --clear-bitmap --uuid 5eed --device "$B" >/dev/null
}

echo "| setup | job | bandwidth | IOPS | node a CPU s/GiB | node b CPU s/GiB | device ms/write | device KiB/write | idle % here | steal % here |"
echo "|---|---|---|---|---|---|---|---|---|---|"
# no_peer ROUND: the jobs against `twinvol export` on DEV_A.
no_peer() {
  # A plain export refuses a device holding twinvol metadata (the mirror rounds write it).
  "$TWINVOL" wipe-md --device "$A" --force >/dev/null
  "${PIN_A[@]}" "$TWINVOL" export "$A" --socket "$W/plain.sock" --engine uring 2>"$W/plain.log" &
  P=$!
  sleep 1; jobs_run "no peer (twinvol export)" "$W/plain.sock" "$1" "$P" ""; kill $P; wait $P 2>/dev/null || true
}

# mirror MODE ROUND: the jobs against node a of a connected pair in MODE.
mirror() {
  local mode=$1 round=$2
  mkmd
  conf a b "$A" "$ADDR_A" "$ADDR_B" "$mode" "$W"; conf b a "$B" "$ADDR_B" "$ADDR_A" "$mode" "$WB"
  put_b "$W/b.toml" "$WB/b.toml"
  start_b "$WB/b.toml" "$WB/b.log"
  # The previous mode's status file says "connected": it must not satisfy the wait below.
  rm -f "$W/a.json"
  "${PIN_A[@]}" "$TWINVOL" mirror --config "$W/a.toml" --primary --status-file "$W/a.json" 2>"$W/a.log" &
  PA=$!
  for _ in $(seq 300); do grep -q '"connected"' "$W/a.json" 2>/dev/null && break; sleep 0.1; done
  if ! grep -q '"connected"' "$W/a.json" 2>/dev/null; then
    echo "node a never connected to node b ($ADDR_B) in 30 s; node a's log:" >&2
    tail -20 "$W/a.log" >&2; echo "node b's log:" >&2; on_b tail -20 "$WB/b.log" >&2 || true
    on_b sh -c 'p=$(cat "$1") && ps -o pid,stat,wchan:20,args -p "$p"' sh "$WB/b.pid" >&2 || true
    exit 1
  fi
  jobs_run "$mode mirror" "$W/a.sock" "$round" "$PA" "$(on_b cat "$WB/b.pid")"
  for _ in $(seq 600); do grep -q '"rpo_bytes": 0' "$W/a.json" && break; sleep 0.1; done
  python3 - "$W/a.json" "$mode" <<'PY' || true
import json, sys
c = json.load(open(sys.argv[1]))["counters"]
# Frames per socket write: how well node a's writer batched .
per_write = "%.1f" % (c["frames_sent"] / c["writes_sent"]) if c.get("writes_sent") else "not counted"
print("# %s: Data bytes sent %d, went ahead %d times (then resynced %d bytes), wire/payload %.3f, frames per socket write %s"
      % (sys.argv[2], c["data_bytes_sent"], c["ahead_events"], c["resync_bytes_sent"],
         c["wire_bytes_sent"] / max(1, c["payload_bytes_sent"]), per_write))
PY
  kill $PA; wait $PA 2>/dev/null || true
  stop_b; wait 2>/dev/null || true
}

# Each round runs every setup once; round r starts r-1 places further along the list. A setup
# measures differently depending on what ran before it (with CPUS_A=0 CPUS_B=1: async 4k right
# after sync 1 MiB 0.75x and 0.76x, the same job run before sync 0.83x; a no-peer 1 MiB run
# right after an async 1 MiB run 728 MiB/s, 2,805 a round earlier), so no setup may always
# hold the same place.
setups=(none $MODES)
for round in $(seq "$ROUNDS"); do
  for i in $(seq 0 $((${#setups[@]} - 1))); do
    s=${setups[$(((i + round - 1) % ${#setups[@]}))]}
    if [ "$s" = none ]; then no_peer "$round"; else mirror "$s" "$round"; fi
  done
done

# Each mirror figure against the no-peer figure of its own round, then the median per row; the
# same for the CPU node a's core spends per GiB written (twinvol and fio), which a machine's
# drift moves far less than the bandwidth (a CPU-bound job's ratio is about the inverse of it).
python3 - "$W/results" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("|") for l in open(sys.argv[1])]
base = {(r, job): (float(bw), ca) for r, label, job, bw, ca, _ in rows
        if label.startswith("no peer")}
ratios, cpu = {}, {}
for r, label, job, bw, ca, cb in rows:
    if not label.startswith("no peer"):
        ratios.setdefault((label, job), []).append(float(bw) / base[(r, job)][0])
        if "-" not in (ca, cb, base[(r, job)][1]):
            cpu.setdefault((label, job), []).append((float(ca) / float(base[(r, job)][1]), cb))
print()
print("| mirror vs no peer | job | ratio per round | median |")
print("|---|---|---|---|")
for (label, job), rs in ratios.items():
    print("| %s | %s | %s | **%.2fx** |" % (label, job, ", ".join("%.2fx" % x for x in rs),
                                           statistics.median(rs)))
print()
print("| node a CPU per GiB, mirror vs no peer | job | per round | median | node b CPU s/GiB, median |")
print("|---|---|---|---|---|")
for (label, job), cs in cpu.items():
    print("| %s | %s | %s | **%.2fx** | %.3f |" % (
        label, job, ", ".join("%.2fx" % a for a, _ in cs),
        statistics.median(a for a, _ in cs), statistics.median(float(b) for _, b in cs)))
PY
