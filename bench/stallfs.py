"""A FUSE file system that passes through to a directory and can stall its writes on demand.

For `bench.isolation`: the daemon's `state_dir` lives here, and while `stalled` every write,
sync, create, truncate and removal waits (as on a disk that stops completing writes), and so
does whatever the kernel queues behind them (one server thread). Pure Python over the kernel's
FUSE protocol (`/dev/fuse`, protocol 7.31), no libfuse; root only. Just the operations SQLite
and the daemon use; the others answer ENOSYS.

    with StallFs(backing, mountpoint) as fs:
        with fs.stalled():
            ...
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")
ATTR_OUT_HEAD = struct.Struct("<QII")
OPEN_OUT = struct.Struct("<QII")
WRITE_IN = struct.Struct("<QQIIQII")
READ_IN = WRITE_IN
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
CREATE_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")

LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
MKDIR, UNLINK, RMDIR = 9, 10, 11
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 25, 26, 27, 28, 29, 30
ACCESS, CREATE, INTERRUPT, DESTROY, BATCH_FORGET = 34, 35, 36, 38, 42
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})
WRITES = frozenset({SETATTR, MKDIR, UNLINK, RMDIR, WRITE, FSYNC, FLUSH, CREATE, FSYNCDIR})
FATTR_MODE, FATTR_SIZE, FATTR_FH = 1, 8, 64
MAX_WRITE = 128 * 1024


class StallFs:
    """`backing` mounted at `mountpoint` through this process; see the module's docstring."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing = backing
        self.mountpoint = mountpoint
        self._open = threading.Event()
        self._open.set()
        self._paths: dict[int, Path] = {1: backing}
        self._ids: dict[Path, int] = {backing: 1}
        self._fds: dict[int, int] = {}
        self._next_fh = 1
        self._fd = -1
        self._thread: threading.Thread | None = None
        self.stalls = 0  # writes held while stalled

    def __enter__(self) -> StallFs:
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        libc = ctypes.CDLL(None, use_errno=True)
        options = f"fd={self._fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        if libc.mount(b"stallfs", str(self.mountpoint).encode(), b"fuse", 0, options) != 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"mount stallfs at {self.mountpoint}: {os.strerror(err)}")
        self._thread = threading.Thread(target=self._serve, name="stallfs", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._open.set()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(str(self.mountpoint).encode(), 2)  # MNT_DETACH
        os.close(self._fd)
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    @contextlib.contextmanager
    def stalled(self) -> Iterator[None]:
        """Writes wait for the block's duration."""
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    # -- the protocol ------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            try:
                request = os.read(self._fd, MAX_WRITE + 65536)
            except OSError as err:
                if err.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                return  # ENODEV: unmounted
            if not request:
                return
            _, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(request)
            body = request[IN_HEADER.size :]
            if opcode in WRITES and not self._open.is_set():
                self.stalls += 1
                self._open.wait()
            if opcode in NO_REPLY:
                continue
            try:
                payload = self._handle(opcode, nodeid, body)
                error = 0
            except OSError as err:
                payload, error = b"", -(err.errno or errno.EIO)
            except Exception:
                payload, error = b"", -errno.EIO
            reply = OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique) + payload
            with contextlib.suppress(OSError):  # the request was interrupted meanwhile
                os.write(self._fd, reply)
            if opcode == DESTROY:
                return

    def _handle(self, opcode: int, nodeid: int, body: bytes) -> bytes:
        path = self._paths.get(nodeid, self.backing)
        if opcode == INIT:
            _major, _minor, readahead, _flags = struct.unpack_from("<IIII", body)
            return INIT_OUT.pack(7, 31, readahead, 0, 16, 12, MAX_WRITE, 1, 32, 0, 0)
        if opcode == LOOKUP:
            return self._entry(path / _name(body))
        if opcode == GETATTR:
            return self._attr_out(path)
        if opcode == SETATTR:
            fields = SETATTR_IN.unpack_from(body)
            valid, fh, size, mode = fields[0], fields[2], fields[3], fields[11]
            if valid & FATTR_SIZE:
                if valid & FATTR_FH and fh in self._fds:
                    os.ftruncate(self._fds[fh], size)
                else:
                    os.truncate(path, size)
            if valid & FATTR_MODE:
                os.chmod(path, mode & 0o7777)
            return self._attr_out(path)
        if opcode == MKDIR:
            mode, _ = MKDIR_IN.unpack_from(body)
            target = path / _name(body[MKDIR_IN.size :])
            os.mkdir(target, mode & 0o7777)
            return self._entry(target)
        if opcode in (UNLINK, RMDIR):
            target = path / _name(body)
            (os.unlink if opcode == UNLINK else os.rmdir)(target)
            return b""
        if opcode in (OPEN, OPENDIR):
            (flags,) = struct.unpack_from("<I", body)
            if opcode == OPENDIR:
                return OPEN_OUT.pack(0, 0, 0)
            return OPEN_OUT.pack(self._keep(os.open(path, flags & ~os.O_CREAT)), 0, 0)
        if opcode == CREATE:
            flags, mode, _, _ = CREATE_IN.unpack_from(body)
            target = path / _name(body[CREATE_IN.size :])
            fh = self._keep(os.open(target, flags | os.O_CREAT, mode & 0o7777))
            return self._entry(target) + OPEN_OUT.pack(fh, 0, 0)
        if opcode == READ:
            fh, offset, size, *_ = READ_IN.unpack_from(body)
            return os.pread(self._fds[fh], size, offset)
        if opcode == WRITE:
            fh, offset, size, *_ = WRITE_IN.unpack_from(body)
            data = body[WRITE_IN.size : WRITE_IN.size + size]
            written = os.pwrite(self._fds[fh], data, offset)
            return struct.pack("<II", written, 0)
        if opcode in (FSYNC, FSYNCDIR, FLUSH, ACCESS):
            (fh,) = struct.unpack_from("<Q", body) if opcode == FSYNC else (None,)
            if fh is not None and fh in self._fds:
                os.fsync(self._fds[fh])
            return b""
        if opcode in (RELEASE, RELEASEDIR):
            (fh,) = struct.unpack_from("<Q", body)
            fd = self._fds.pop(fh, None) if opcode == RELEASE else None
            if fd is not None:
                os.close(fd)
            return b""
        if opcode == STATFS:
            st = os.statvfs(self.backing)
            return STATFS_OUT.pack(
                st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree,
                st.f_bsize, st.f_namemax, st.f_frsize, 0,
            )  # fmt: skip
        if opcode == DESTROY:
            return b""
        raise OSError(errno.ENOSYS, "not implemented")

    def _keep(self, fd: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._fds[fh] = fd
        return fh

    def _node(self, path: Path) -> int:
        node = self._ids.get(path)
        if node is None:
            node = self._ids[path] = len(self._ids) + 1
            self._paths[node] = path
        return node

    def _attr(self, path: Path) -> bytes:
        st = os.lstat(path)
        return ATTR.pack(
            st.st_ino, st.st_size, st.st_blocks, int(st.st_atime), int(st.st_mtime),
            int(st.st_ctime), 0, 0, 0, st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
            st.st_rdev, st.st_blksize, 0,
        )  # fmt: skip

    def _entry(self, path: Path) -> bytes:
        attr = self._attr(path)  # ENOENT for a name that is not there
        return ENTRY_OUT_HEAD.pack(self._node(path), 0, 0, 0, 0, 0) + attr

    def _attr_out(self, path: Path) -> bytes:
        return ATTR_OUT_HEAD.pack(0, 0, 0) + self._attr(path)


def _name(body: bytes) -> str:
    return body.split(b"\0", 1)[0].decode()
