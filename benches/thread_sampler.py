#!/usr/bin/env python3
"""Samples what twinvol and fio threads are doing, to explain dips in a benchmark's bandwidth.

  benches/thread_sampler.py record OUT [INTERVAL_S]   # until killed, default every 0.05 s
  benches/thread_sampler.py report OUT [MIB_S]        # samples where node a's sending fell below MIB_S (default 50)

`record` writes one line per sample: the time; per process (twinvol, tagged by its --config file's
name, "a" or "b" in benches/mirror_fio.sh, or "export"; fio) the bytes read and written so far
(/proc/PID/io); per thread its state, and for a thread not running its kernel wait channel and
current system call number (/proc/PID/task/TID/{stat,wchan,syscall}); the per-CPU tick counters of
/proc/stat; TCP counters that moved (timeouts, retransmissions, drops, pruning). Run it on a core
the measurement does not use (e.g. `taskset -c 1` with CPUS_A=0).

`report` prints, for each interval in which node a wrote (to its replication socket) less than
MIB_S, the interval's CPU ticks (u user, s system, i idle, w iowait, st steal) and every thread not
running or sleeping in epoll: a thread in state D with syscall 82 is in rename(2), 75 fdatasync(2).
The status-file stall of the data-path thread was found this way (docs/BENCHMARKS.md).
"""
import glob
import signal
import sys
import time

TCP_KEYS = ["TcpExt:TCPTimeouts", "Tcp:RetransSegs", "TcpExt:TCPBacklogDrop",
            "TcpExt:TCPRcvQDrop", "TcpExt:PruneCalled", "TcpExt:TCPZeroWindowDrop",
            "TcpExt:TCPLossProbes"]


def read(path):
    with open(path) as f:
        return f.read()


def processes():
    found = []
    for p in glob.glob("/proc/[0-9]*"):
        try:
            comm = read(p + "/comm").strip()
            if not (comm.startswith("twinvol") or comm == "fio"):
                continue
            args = read(p + "/cmdline").split("\0")
        except OSError:
            continue
        tag = "fio" if comm == "fio" else "export" if "export" in args else comm
        if "--config" in args[:-1]:
            cfg = args[args.index("--config") + 1]
            tag = cfg.rsplit("/", 1)[-1].removesuffix(".toml")
        found.append((p, tag))
    return found


def tcp_counters():
    counters = {}
    try:
        lines = read("/proc/net/netstat").splitlines() + read("/proc/net/snmp").splitlines()
    except OSError:
        return counters
    for names, values in zip(lines[0::2], lines[1::2]):
        k, v = names.split(), values.split()
        for a, b in zip(k[1:], v[1:]):
            counters[k[0] + a] = int(b)
    return counters


def record(out, interval):
    prev = tcp_counters()
    with open(out, "w") as f:
        while True:
            t = time.time()
            line = ["%.3f" % t]
            for p, tag in processes():
                try:
                    io = dict(l.split(": ") for l in read(p + "/io").splitlines())
                except OSError:
                    continue
                line.append("%s:r=%s,w=%s" % (tag, io["rchar"], io["wchar"]))
                for task in glob.glob(p + "/task/*"):
                    try:
                        st = read(task + "/stat")
                        close = st.rindex(")")
                        state, name = st[close + 2], st[st.index("(") + 1:close]
                        wchan = syscall = ""
                        if state != "R":
                            wchan = read(task + "/wchan").strip()
                            syscall = read(task + "/syscall").split()[0]
                    except (OSError, ValueError, IndexError):
                        continue
                    line.append("%s/%s:%s:%s:%s" % (tag, name.replace(" ", "_"), state, wchan, syscall))
            for l in read("/proc/stat").splitlines():
                if l.startswith("cpu") and l[3] != " ":
                    v = l.split()
                    line.append("%s:%s" % (v[0], ",".join(v[1:9])))
            now = tcp_counters()
            moved = ["%s=%d" % (k.split(":")[1], now.get(k, 0) - prev.get(k, 0))
                     for k in TCP_KEYS if now.get(k, 0) != prev.get(k, 0)]
            prev = now
            line.append("tcp:" + ",".join(moved))
            f.write(" ".join(line) + "\n")
            f.flush()
            time.sleep(max(0.0, interval - (time.time() - t)))


def parse(out):
    rows = []
    for l in open(out):
        fields = l.split()
        t, io, cpu, threads = float(fields[0]), {}, {}, []
        for x in fields[1:]:
            if ":r=" in x:
                tag, rest = x.split(":", 1)
                r, w = rest.split(",")
                io.setdefault(tag, (int(r[2:]), int(w[2:])))
            elif x.startswith("cpu"):
                k, v = x.split(":")
                cpu[k] = [int(y) for y in v.split(",")]
            elif "/" in x.split(":", 1)[0]:
                threads.append(x)
        rows.append((t, io, cpu, threads))
    return rows


def report(out, floor):
    rows = parse(out)
    if not rows:
        return
    t0 = rows[0][0]
    for (t1, io1, c1, _), (t2, io2, c2, threads) in zip(rows, rows[1:]):
        if "a" not in io1 or "a" not in io2:
            continue
        rate = (io2["a"][1] - io1["a"][1]) / (t2 - t1) / 1048576
        if rate >= floor:
            continue
        ticks = []
        for k in sorted(c2):
            d = [b - a for a, b in zip(c1.get(k, c2[k]), c2[k])]
            ticks.append("%s u%d s%d i%d w%d st%d" % (k, d[0], d[2], d[3], d[4], d[7]))
        waiting = [x for x in threads if ":R:" not in x and ":do_epoll_wait:" not in x]
        print("%7.2f s  node a sent %4.0f MiB/s | %s | %s" % (t2 - t0, rate, " | ".join(ticks), " ".join(waiting)))


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `report ... | head` ends quietly
    if len(sys.argv) < 3 or sys.argv[1] not in ("record", "report"):
        sys.exit(__doc__)
    if sys.argv[1] == "record":
        record(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.05)
    else:
        report(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 50.0)
