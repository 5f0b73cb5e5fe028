#!/usr/bin/env python3
"""Writes seed client streams for the `nbd_stream` fuzz target into fuzz/seeds/nbd_stream/.

Each seed is what a client sends: the fixed-newstyle handshake with NBD_OPT_GO for the default
export, then transmission requests (written from the NBD protocol document, not from the Rust
code). They reach the server's large-write path: a write payload of 64 KiB or more is read past
the connection's read buffer, straight from the stream. The fuzzer's default -max_len follows
the largest seed, so without these no mutated input was long enough to reach that path.
The target serves a 1 MiB RAM disk.
"""
import os, struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "nbd_stream")
REQUEST_MAGIC = 0x25609513
WRITE, DISC, FLUSH, READ = 1, 2, 3, 0
FUA = 1

# Client flags (FIXED_NEWSTYLE | NO_ZEROES), then NBD_OPT_GO (7) for export "" with no info
# requests: name length 0, request count 0.
HANDSHAKE = struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 7, 6) + struct.pack(">IH", 0, 0)


def request(kind, handle, offset, length, flags=0):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, kind, handle, offset, length)


def payload(n, seed):
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


seeds = {
    # 64 KiB + 1 at an odd offset, 200,000 bytes with FUA, read one back, flush, disconnect.
    "large-writes-odd-offsets": HANDSHAKE
    + request(WRITE, 1, 4097, 65537) + payload(65537, 1)
    + request(WRITE, 2, 300001, 200000, FUA) + payload(200000, 2)
    + request(READ, 3, 300001, 4096)
    + request(FLUSH, 4, 0, 0)
    + request(DISC, 5, 0, 0),
    # A large write past the device's end (its payload must be consumed, not taken as
    # requests), then a write that fits, then disconnect.
    "large-write-past-the-end": HANDSHAKE
    + request(WRITE, 1, (1 << 20) - 4096, 131072) + payload(131072, 3)
    + request(WRITE, 2, 0, 4096) + payload(4096, 4)
    + request(DISC, 3, 0, 0),
    # The stream ends in the middle of a large write's payload.
    "large-write-cut-short": HANDSHAKE
    + request(WRITE, 1, 8192, 98304) + payload(70000, 5),
}

os.makedirs(OUT, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)
    print(f"{name}: {len(data)} bytes")
