#!/usr/bin/env python3
"""A FUSE file system that passes every file of BACKING through to MOUNT and fails I/O on
command: the disk-error tests put a volume's device here and break it at a chosen moment.

Usage: faultyfs.py BACKING MOUNT   (runs in the foreground until unmounted)

Control: write one word to MOUNT/.faults (or read it back):
  none   every operation passes through (the default)
  write  every write fails with EIO
  read   every read fails with EIO
  fsync  every fsync/fdatasync fails with EIO
  all    writes, reads and fsyncs fail with EIO
Several words may be given, separated by spaces ("write fsync").
"""

import errno
import os
import sys
import threading

from fuse import FUSE, FuseOSError, Operations

CONTROL = "/.faults"
WORDS = {"write", "read", "fsync"}


class Faulty(Operations):
    def __init__(self, root):
        self.root = root
        self.faults = set()
        self.mu = threading.Lock()

    def _path(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def _fails(self, what):
        with self.mu:
            return what in self.faults

    def _control_text(self):
        with self.mu:
            return (" ".join(sorted(self.faults)) or "none") + "\n"

    # Metadata.
    def getattr(self, path, fh=None):
        if path == CONTROL:
            st = os.lstat(self.root)
            return {
                "st_mode": 0o100600,
                "st_nlink": 1,
                "st_size": len(self._control_text()),
                "st_uid": st.st_uid,
                "st_gid": st.st_gid,
                "st_atime": st.st_atime,
                "st_mtime": st.st_mtime,
                "st_ctime": st.st_ctime,
            }
        st = os.lstat(self._path(path))
        keys = ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_atime", "st_mtime", "st_ctime", "st_blocks")
        return {k: getattr(st, k) for k in keys}

    def readdir(self, path, fh):
        return [".", "..", CONTROL[1:]] + os.listdir(self._path(path))

    def truncate(self, path, length, fh=None):
        if path == CONTROL:
            return
        with open(self._path(path), "r+b") as f:
            f.truncate(length)

    def unlink(self, path):
        os.unlink(self._path(path))

    def chmod(self, path, mode):
        os.chmod(self._path(path), mode)

    def utimens(self, path, times=None):
        if path != CONTROL:
            os.utime(self._path(path), times)

    # Files.
    def create(self, path, mode, fi=None):
        return os.open(self._path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def open(self, path, flags):
        if path == CONTROL:
            return 0
        # O_DIRECT is not passed on: the page cache of the backing file stays out of the test.
        return os.open(self._path(path), flags & ~getattr(os, "O_DIRECT", 0))

    def read(self, path, size, offset, fh):
        if path == CONTROL:
            return self._control_text().encode()[offset:offset + size]
        if self._fails("read"):
            raise FuseOSError(errno.EIO)
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        if path == CONTROL:
            words = set(data.decode(errors="replace").split())
            with self.mu:
                if "all" in words:
                    self.faults = set(WORDS)
                else:
                    self.faults = words & WORDS
            return len(data)
        if self._fails("write"):
            raise FuseOSError(errno.EIO)
        return os.pwrite(fh, data, offset)

    def fsync(self, path, datasync, fh):
        if path == CONTROL:
            return 0
        if self._fails("fsync"):
            raise FuseOSError(errno.EIO)
        return os.fsync(fh)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        if path != CONTROL:
            os.close(fh)
        return 0


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    backing, mount = sys.argv[1], sys.argv[2]
    FUSE(Faulty(backing), mount, foreground=True, nothreads=False, allow_other=False, default_permissions=False)


if __name__ == "__main__":
    main()
