#!/usr/bin/env python3
"""End-to-end NBD benchmark: the same fio jobs against twinvol, qemu-nbd and nbdkit serving the
same backing file or device, interleaved in one invocation, plus fio's io_uring engine directly on
the backing store as the ceiling.

Like is compared with like:
  direct (page cache bypassed): fio io_uring --direct=1 (ceiling) | twinvol --cache none |
                                qemu-nbd --cache=none --aio=io_uring
  buffered:                     twinvol --cache writeback | qemu-nbd --cache=writeback | nbdkit file

Usage (as root):
  benches/nbd_fio.py BACKING [--size 2G] [--runtime 10] [--rounds 1] [--out docs/bench]
                     [--twinvol PATH] [--yes-destroy-data]
BACKING is a file (created and filled with random data if missing) or a block device such as
/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol... (its contents are overwritten: pass
--yes-destroy-data). Writes a JSON and a Markdown report next to --out.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

JOBS = [
    # name, rw, bs, iodepth, numjobs
    ("4k-randread-qd32-1job", "randread", "4k", 32, 1),
    ("4k-randread-qd32-4jobs", "randread", "4k", 32, 4),
    ("4k-randwrite-qd32-1job", "randwrite", "4k", 32, 1),
    ("4k-randwrite-qd32-4jobs", "randwrite", "4k", 32, 4),
    ("1m-seqread-qd8", "read", "1M", 8, 1),
    ("1m-seqwrite-qd8", "write", "1M", 8, 1),
]


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def need(tool):
    if shutil.which(tool) is None:
        sys.exit(f"nbd_fio: `{tool}` is missing: run scripts/test-deps.sh")


def wait_socket(path, proc, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {path}")


class Server:
    """A server process exporting the backing store on a Unix socket."""

    def __init__(self, name, mode, argv_fn, pid_is_server=True):
        self.name, self.mode, self.argv_fn = name, mode, argv_fn
        self.proc = None

    def start(self, backing, sock):
        if os.path.exists(sock):
            os.unlink(sock)
        self.proc = subprocess.Popen(self.argv_fn(backing, sock), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_socket(sock, self.proc)
        return f"nbd+unix:///?socket={sock}"

    def peak_rss_kib(self):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_fio(job, target, runtime, size):
    name, rw, bs, iodepth, numjobs = job
    argv = ["fio", "--name=" + name, "--rw=" + rw, "--bs=" + bs, f"--iodepth={iodepth}", f"--numjobs={numjobs}",
            "--group_reporting", "--time_based", f"--runtime={runtime}", "--ramp_time=1", f"--size={size}",
            "--randrepeat=0", "--output-format=json"]
    if numjobs > 1 and rw in ("read", "write"):
        argv.append("--offset_increment=" + str(size // numjobs))
    if target[0] == "direct":
        argv += ["--ioengine=io_uring", "--direct=1", "--filename=" + target[1]]
    else:
        argv += ["--ioengine=nbd", "--uri=" + target[1]]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fio failed: {out.stderr.strip()[:500]}")
    data = json.loads(out.stdout[out.stdout.index("{"):])
    j = data["jobs"][0]
    side = j["read"] if rw in ("read", "randread") else j["write"]
    return {"iops": side["iops"], "bw_mib": side["bw_bytes"] / (1 << 20), "lat_us_mean": side["lat_ns"]["mean"] / 1000}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("backing")
    ap.add_argument("--size", default="2G", help="file size to create / region to use (default 2G)")
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio run (default 10)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default 1)")
    ap.add_argument("--out", default="bench-nbd", help="report path prefix (.json and .md are added)")
    ap.add_argument("--twinvol", default=None, help="twinvol binary (default: target/release via CARGO_TARGET_DIR)")
    ap.add_argument("--modes", default="direct,buffered")
    ap.add_argument("--jobs", default=",".join(j[0] for j in JOBS))
    ap.add_argument("--yes-destroy-data", action="store_true")
    a = ap.parse_args()
    for t in ("fio", "qemu-nbd", "nbdkit"):
        need(t)
    size = parse_size(a.size)
    tv = a.twinvol or os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "twinvol")
    if not os.access(tv, os.X_OK):
        sys.exit(f"nbd_fio: no twinvol binary at {tv}: build it with `cargo build --release`")

    backing = a.backing
    if os.path.exists(backing) and stat.S_ISBLK(os.stat(backing).st_mode):
        if not a.yes_destroy_data:
            sys.exit(f"nbd_fio: {backing} is a block device and the write jobs overwrite it: pass --yes-destroy-data")
    elif not os.path.exists(backing) or os.path.getsize(backing) < size:
        print(f"nbd_fio: filling {backing} with {a.size} of random data", flush=True)
        subprocess.run(["dd", "if=/dev/urandom", "of=" + backing, "bs=1M", f"count={size >> 20}", "oflag=direct", "status=none"], check=True)

    tmp = tempfile.mkdtemp(prefix="twinvol-bench-")
    sock = os.path.join(tmp, "nbd.sock")
    servers = {
        "direct": [
            Server("twinvol (uring, O_DIRECT)", "direct", lambda b, s: [tv, "export", b, "--socket", s, "--engine", "uring", "--cache", "none"]),
            Server("qemu-nbd (cache=none, aio=io_uring)", "direct", lambda b, s: ["qemu-nbd", "-t", "-f", "raw", "--cache=none", "--aio=io_uring", "-e", "0", "-k", s, b]),
        ],
        "buffered": [
            Server("twinvol (uring, writeback)", "buffered", lambda b, s: [tv, "export", b, "--socket", s, "--engine", "uring", "--cache", "writeback"]),
            Server("qemu-nbd (cache=writeback)", "buffered", lambda b, s: ["qemu-nbd", "-t", "-f", "raw", "--cache=writeback", "-e", "0", "-k", s, b]),
            Server("nbdkit file (default)", "buffered", lambda b, s: ["nbdkit", "-f", "-U", s, "file", b]),
        ],
    }
    modes = a.modes.split(",")
    jobs = [j for j in JOBS if j[0] in a.jobs.split(",")]
    results = []  # rows: job, mode, target, round, metrics
    rss = {}
    for rnd in range(a.rounds):
        for job in jobs:
            if "direct" in modes:
                m = run_fio(job, ("direct", backing), a.runtime, size)
                results.append({"job": job[0], "mode": "direct", "target": "fio io_uring direct (ceiling)", "round": rnd, **m})
                print(f"{job[0]:26} {'fio io_uring direct':38} {m['iops']:10.0f} IOPS {m['bw_mib']:8.1f} MiB/s", flush=True)
            for mode in modes:
                for srv in servers[mode]:
                    uri = srv.start(backing, sock)
                    try:
                        m = run_fio(job, ("nbd", uri), a.runtime, size)
                        if srv.name.startswith("twinvol") and job[4] == 4 and job[1] in ("randread", "randwrite"):
                            rss_kib = srv.peak_rss_kib()
                            rss[f"{srv.name} {job[0]}"] = rss_kib
                    finally:
                        srv.stop()
                    results.append({"job": job[0], "mode": mode, "target": srv.name, "round": rnd, **m})
                    print(f"{job[0]:26} {srv.name:38} {m['iops']:10.0f} IOPS {m['bw_mib']:8.1f} MiB/s", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)

    # Averages over rounds, then ratios against the like-for-like peer and the ceiling.
    def avg(job, target, key):
        v = [r[key] for r in results if r["job"] == job and r["target"] == target]
        return sum(v) / len(v) if v else None

    lines = [
        f"Backing: `{backing}` ({a.size}), {a.runtime} s per run, {a.rounds} round(s), jobs interleaved across servers.",
        f"Host: {os.cpu_count()} CPUs, kernel {os.uname().release}. Command: `{' '.join(sys.argv)}`",
        "",
        "| job | mode | target | IOPS | MiB/s | mean lat (us) | vs peer | vs ceiling |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    summary = []
    for job in jobs:
        key = "bw_mib" if job[2] == "1M" else "iops"
        ceiling = avg(job[0], "fio io_uring direct (ceiling)", key)
        for mode in ["direct"] + [m for m in modes if m != "direct"]:
            if mode not in modes:
                continue
            targets = (["fio io_uring direct (ceiling)"] if mode == "direct" else []) + [s.name for s in servers[mode]]
            peer = avg(job[0], servers[mode][1].name, key)
            for t in targets:
                iops, bw, lat = avg(job[0], t, "iops"), avg(job[0], t, "bw_mib"), avg(job[0], t, "lat_us_mean")
                v = avg(job[0], t, key)
                vs_peer = f"{v / peer:.2f}x" if t.startswith("twinvol") and peer else ""
                vs_ceiling = f"{v / ceiling:.0%}" if ceiling and mode == "direct" and not t.startswith("fio") else ""
                lines.append(f"| {job[0]} | {mode} | {t} | {iops:.0f} | {bw:.1f} | {lat:.0f} | {vs_peer} | {vs_ceiling} |")
                if t.startswith("twinvol"):
                    summary.append({"job": job[0], "mode": mode, "metric": key, "twinvol": v, "peer": peer,
                                    "ratio_vs_peer": v / peer if peer else None,
                                    "ratio_vs_ceiling": v / ceiling if ceiling and mode == "direct" else None})
    lines.append("")
    for k, v in rss.items():
        lines.append(f"Peak RSS of {k}: {v / 1024:.1f} MiB" if v else f"Peak RSS of {k}: unknown")
    md = "\n".join(lines) + "\n"
    with open(a.out + ".json", "w") as f:
        json.dump({"results": results, "summary": summary, "peak_rss_kib": rss, "argv": sys.argv}, f, indent=2)
    with open(a.out + ".md", "w") as f:
        f.write(md)
    print()
    print(md)


if __name__ == "__main__":
    main()
