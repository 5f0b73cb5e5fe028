# Sourced by the replication benchmarks: node b runs on this machine or, through RUN_B, on
# another host (or in a network namespace) while node a and the measurement run here.
#
# RUN_B: a command prefix to which one argument, a shell command line, is appended, and which
#   runs that line on node b with stdin passed through: "ssh HOST [sudo]", or
#   "ip netns exec NS sh -c". Empty: node b runs here.
# TWINVOL_B: the twinvol binary on node b. W: this machine's work directory (must exist).
# Sets WB, node b's work directory (W itself when node b runs here).

# on_b CMD...: runs CMD on node b (stdin passed through): the words go to RUN_B as one quoted
# command line, which a remote shell splits back into exactly these words.
on_b() { if [ -n "$RUN_B" ]; then $RUN_B "$(printf '%q ' "$@")"; else "$@"; fi; }

WB=$W
[ -z "$RUN_B" ] || WB=$(on_b mktemp -d /var/tmp/twinvol-bench-b-XXXX)

# sized DEV SIZE / sized_b DEV SIZE: a block device is left as it is; anything else becomes a
# fresh sparse file of SIZE, here or on node b.
SIZED_SH='[ -b "$1" ] || { rm -f "$1"; truncate -s "$2" "$1"; }'
sized() { sh -c "$SIZED_SH" sh "$1" "$2"; }
sized_b() { on_b sh -c "$SIZED_SH" sh "$1" "$2"; }

# put_b LOCAL REMOTE: copies a file of this machine to node b (mode 600).
put_b() {
  if [ -z "$RUN_B" ] && [ "$1" = "$2" ]; then return 0; fi
  on_b sh -c 'umask 077; cat >"$1"' sh "$2" <"$1"
}

# start_b CONFIG LOG [ARGS...]: starts `twinvol mirror --config CONFIG --secondary ARGS` on
# node b in the background, stderr to LOG there; its pid is kept there so that stop_b stops
# it (killing a local ssh client would not). CPUS_B, when set, is a taskset CPU list node b
# runs on (the process and every thread it starts).
start_b() {
  local cfg=$1 log=$2
  shift 2
  # One line: on_b quotes the script with printf %q, which would write a newline as $'\n', a
  # form a remote POSIX sh does not read.
  on_b sh -c 'echo $$ >"$1"; b=$2 c=$3 l=$4 p=$5; shift 5; set -- "$b" mirror --config "$c" --secondary "$@"; [ -z "$p" ] || set -- taskset -c "$p" "$@"; exec "$@" 2>"$l"' \
    sh "$WB/b.pid" "$TWINVOL_B" "$cfg" "$log" "${CPUS_B:-}" "$@" </dev/null &
}

# stop_b: stops node b's twinvol and waits until it has exited.
stop_b() {
  on_b sh -c 'p=$(cat "$1" 2>/dev/null) && kill "$p" 2>/dev/null; while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; rm -f "$1"' \
    sh "$WB/b.pid" || true
}

# cleanup_b: stops node b and removes its work directory when it is not this machine's.
cleanup_b() {
  stop_b
  if [ -n "$RUN_B" ]; then on_b rm -rf "$WB" || true; fi
}
