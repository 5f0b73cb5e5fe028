#!/usr/bin/env python3
"""Writes seed frames for the `repl_wire_decoder` fuzz target into fuzz/seeds/repl-wire-frames/.

Written from docs/PROTOCOL.md alone (not from the Rust code), so the test
`repl::wire::tests::documented_layout_seeds_decode` also checks that the document and the
implementation agree. Compressed seeds need the `zstd` command-line tool.
"""
import os, shutil, struct, subprocess, zlib

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "repl-wire-frames")
MAGIC = 0x54565250


def frame(kind, payload, seq=0, offset=0, compress=False):
    flags, wire = 0, payload
    if compress:
        z = subprocess.run(["zstd", "-1", "-q", "-c"], input=payload, capture_output=True, check=True).stdout
        if len(z) < len(payload):
            flags, wire = 1, z
    head = struct.pack(">IBBHQQIII", MAGIC, 1, kind, flags, seq, offset, len(payload), len(wire), zlib.crc32(payload))
    return head + struct.pack(">I", zlib.crc32(head)) + wire


def hello(node, peer):
    n, p = node.encode(), peer.encode()
    return (struct.pack(">HH", 1, 1) + bytes(range(16)) + bytes([len(n)]) + n + bytes([len(p)]) + p
            + struct.pack(">QQQQIIQQ", 5, 0, 4, 3, 2, 4096, 1 << 30, 7))


def data(epoch, flags, body):
    return struct.pack(">QII", epoch, flags, len(body)) + body


text = b"".join(b'{"id":%d,"status":"active","amount":%d.00}\n' % (i, i * 7) for i in range(200))
seeds = {
    "hello": frame(0x01, hello("node-a", "node-b")),
    "auth": frame(0x02, bytes(32)) + frame(0x03, bytes(range(32))),
    "data-raw": frame(0x10, data(1, 1, b"x" * 512), seq=7, offset=4096),
    "ack-barrier-flush": frame(0x11, struct.pack(">I", 0), seq=7) + frame(0x12, struct.pack(">Q", 1), seq=8) + frame(0x13, b"", seq=9),
    "bitmap-two-chunks": frame(0x20, struct.pack(">Q", 6) + b"abc", offset=0) + frame(0x20, struct.pack(">Q", 6) + b"def", offset=3),
    "resync": frame(0x30, struct.pack(">IBII", 8192, 1, 4096, 2) + struct.pack(">II", 1, 2), seq=3, offset=0)
    + frame(0x31, struct.pack(">IB", 8192, 1), seq=3, offset=0),
    "verify": frame(0x40, struct.pack(">II", 8192, 4096), seq=4, offset=8192)
    + frame(0x41, struct.pack(">III", 8192, 4096, 2) + struct.pack(">II", 10, 20), seq=4, offset=8192),
    "ping-pong-disconnect": frame(0x50, struct.pack(">Q", 42)) + frame(0x51, struct.pack(">Q", 42))
    + frame(0x7F, struct.pack(">HH", 1, 3) + b"bye"),
}
# Bulk payloads (64 KiB of data or more, raw): the receiver reads them into an aligned buffer.
noise = bytes((i * 2654435761 >> 13) & 0xFF for i in range(70000))
seeds["data-bulk"] = frame(0x10, data(3, 0, noise), seq=9, offset=2 << 20) + frame(0x50, struct.pack(">Q", 9))
seeds["resync-bulk"] = frame(0x31, struct.pack(">IB", len(noise), 0) + noise, seq=10, offset=3 << 20)
if shutil.which("zstd"):
    seeds["data-zstd"] = frame(0x10, data(2, 0, text), seq=8, offset=1 << 20, compress=True)

os.makedirs(OUT, exist_ok=True)
for name, b in seeds.items():
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(b)
print(f"wrote {len(seeds)} seeds to {OUT}")
