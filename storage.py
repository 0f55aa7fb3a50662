"""
Files that survive a crash, and the lock that keeps two runs out of one directory.

Every write goes to a temp file with a unique name in the destination's directory, is flushed
to disk (fsync), then renamed over the destination: a reader sees the old file or the new one,
never half of one, and a kill at any moment leaves at worst a temp file, which the next run in
that directory removes (clean_temp_files). On any failure, Ctrl-C and a full disk included, the
temp file is removed before the error goes on; a full disk becomes DiskFull with one clear line.

Checksums. save_torch appends a trailer to the file torch.save wrote: the sha256 of those bytes and
their length (torch.load, and any zip reader, ignore bytes after the archive). load_torch checks it
before unpickling anything, so a flipped bit is one line naming the file, not weights that load
and quietly differ. A file that ends with the zip archive itself is an older checkpoint without a
trailer: it loads unverified.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
from typing import BinaryIO, Callable, Iterator

TEMP_PREFIX = ".tmp-"          # every temp file and directory written here starts with this
FILE_MODE = 0o644              # the same mode for every file we write (mkstemp would give 0600)


class DiskFull(OSError):
    """No space left while writing `path`; the previous version of the file is intact."""

    def __str__(self) -> str:          # the message alone, without OSError's "[Errno 28]"
        return self.strerror


def _disk_full(e: BaseException, path: str) -> BaseException:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(e.errno, f"no space left on the device while writing {path}; the previous "
                                 "version (if any) is intact. Free some space and run the same command again")
    return e


class UnusableDirectory(OSError):
    """An output directory that cannot be created or written. `machine` is True where the machine
    is at fault (a read-only mount, an I/O error: exit code 1), False where the path is (a file in
    the way, no permission: a mistake, exit code 2)."""

    machine = False

    def __str__(self) -> str:
        return self.strerror


MACHINE_ERRNOS = (errno.EROFS, errno.EIO, errno.ENOSPC, errno.EDQUOT)


def unusable_directory(e: OSError, path: str, what: str = "the output directory") -> UnusableDirectory:
    """One clear line for an OSError met while creating or locking the directory `path`."""
    if e.errno == errno.EROFS:
        text = f"{what} {path} is on a read-only file system; choose a writable place (or remount it read-write)"
    elif e.errno in (errno.EACCES, errno.EPERM):
        text = f"{what} {path} cannot be written: permission denied ({e.filename}); choose another place"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST):
        text = f"{what} {path} cannot be a directory: a part of that path is a file ({e.filename})"
    else:
        text = f"{what} {path} cannot be created or written ({e.strerror}: {e.filename})"
    err = UnusableDirectory(e.errno, text)
    err.machine = e.errno in MACHINE_ERRNOS
    return err


def exit_quietly_on_ctrl_c(message: str = "interrupted", code: int = 130) -> None:
    """Until main() runs, make Ctrl-C end the process at once with one line and exit code `code`
    (the one the script gives Ctrl-C later: 130, or 1 for train.py and study.py),
    not a KeyboardInterrupt traceback from inside an import (torch alone loads for seconds);
    nothing is written before main(), so there is nothing to clean up. A script calls this at its
    top, before its heavy imports; runtime.run_cli (or the script) restores Python's handler."""
    import signal
    import sys

    def stop(signum, frame):
        sys.stderr.write(f"{message}\n")
        sys.stderr.flush()
        os._exit(code)
    signal.signal(signal.SIGINT, stop)


def restore_ctrl_c() -> None:
    """Python's own Ctrl-C again (KeyboardInterrupt), for main()'s cleanup and messages."""
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def fsync_dir(directory: str) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Call write(f) on a temp file beside `path`, fsync it, then rename it to `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{TEMP_PREFIX}{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        err = _disk_full(e, path)
        if err is e:
            raise
        raise err from e
    fsync_dir(directory)


class CorruptFile(RuntimeError):
    """A file whose contents are not what was written (its checksum differs, or it is unreadable)."""


# the checksum trailer: payload length (8 bytes, little-endian), sha256 of the payload (32), magic (8)
TRAILER_MAGIC = b"KRONYSUM"
TRAILER_BYTES = 8 + 32 + len(TRAILER_MAGIC)
ZIP_END = b"PK\x05\x06"        # a zip's end-of-central-directory record, the last 22 bytes of torch.save's file
ZIP_END_BYTES = 22
CHUNK = 1 << 24


def file_sha256(path: str, length: int | None = None, each_chunk: Callable[[memoryview], None] | None = None) -> str:
    """sha256 of a file's first `length` bytes (all of it by default), streamed; each_chunk sees
    every chunk too (one pass for several checks)."""
    h, buf = hashlib.sha256(), bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        left = os.fstat(f.fileno()).st_size if length is None else length
        while left > 0:
            n = f.readinto(view[:min(CHUNK, left)])
            if not n:
                break
            h.update(view[:n])
            if each_chunk is not None:
                each_chunk(view[:n])
            left -= n
    return h.hexdigest()


def file_identity(path: str) -> list[int]:
    """What changes whenever a file's bytes may have: a rewrite, a copy, a touch (ctime cannot be
    set back by a user, so a tool that restores mtime still shows)."""
    st = os.stat(path)
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


_VERIFIED: set[tuple] = set()     # (path, identity) of the files this process has checked already


def verify_checksum(path: str) -> bool:
    """Check the trailer save_torch wrote; True when verified, False for a file without one (an
    older checkpoint), CorruptFile when the bytes are not the ones written."""
    key = (os.path.abspath(path), *file_identity(path))
    if key in _VERIFIED:
        return True
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - TRAILER_BYTES))
        tail = f.read()
    if tail.endswith(TRAILER_MAGIC) and size >= TRAILER_BYTES:
        length, digest = int.from_bytes(tail[:8], "little"), tail[8:40].hex()
        if length != size - TRAILER_BYTES:
            raise CorruptFile(f"{path} is corrupt: it holds {size - TRAILER_BYTES:,} bytes before its checksum, "
                              f"not the {length:,} that were written (truncated or damaged){_advice(path)}")
        if file_sha256(path, length) != digest:
            raise CorruptFile(f"{path} is corrupt: its contents do not match the checksum stored when it was "
                              f"written (a damaged disk or copy){_advice(path)}")
        _VERIFIED.add(key)
        return True
    if tail[-ZIP_END_BYTES:][:4] == ZIP_END:
        return False                    # written before checksums: the archive ends the file
    raise CorruptFile(f"{path} is truncated or corrupt: it ends neither with its checksum nor with a "
                      f"complete archive{_advice(path)}")


def _advice(path: str) -> str:
    """What to use instead of a damaged file: the run directory's other checkpoint, where there is one."""
    other = {"ckpt_best.pt": "ckpt_last.pt", "ckpt_last.pt": "ckpt_best.pt"}.get(os.path.basename(path))
    if other and os.path.isfile(os.path.join(os.path.dirname(path), other)):
        return f"; {other} beside it may be intact: use that one"
    return "; use another copy, or write it again"


def load_torch(path: str, map_location="cpu", mmap: bool = False):
    """torch.load(weights_only=True) of a file save_torch wrote, its checksum verified first;
    CorruptFile (one line naming the file) when it is damaged or unreadable."""
    import torch
    verify_checksum(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise CorruptFile(f"{path} is not a readable checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                          f"it may be truncated or corrupt{_advice(path)}") from e


class _RecordingWriter:
    """A file's write() that remembers the OSError it raised (see save_torch), and hashes what
    it writes (the checksum trailer)."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None
        self.sha, self.length = hashlib.sha256(), 0

    def write(self, b) -> int:
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = e
            raise
        self.sha.update(memoryview(b)[:n])
        self.length += n
        return n

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj, path: str) -> None:
    """torch.save, atomically, with the checksum trailer (see the module docstring)."""
    import torch

    def save(f: BinaryIO) -> None:
        # torch.save reports a write that failed (a full disk) as its own RuntimeError ("unexpected
        # pos"); raise the OSError behind it, so that a full disk is DiskFull here too
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise
        f.write(writer.length.to_bytes(8, "little") + writer.sha.digest() + TRAILER_MAGIC)
    atomic_write(path, save)


def atomic_copy(src: str, dst: str) -> None:
    """Copy the file src to dst, atomically."""
    def copy(f: BinaryIO) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 24)
    atomic_write(dst, copy)


def write_json(obj, path: str) -> None:
    """json.dump (indented), atomically."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


@contextlib.contextmanager
def atomic_directory(dest: str) -> Iterator[str]:
    """Yield an empty temp directory beside `dest`; when the block ends without an error it
    replaces `dest` whole (the old one, if any, is removed after the swap), else it is removed.

    A kill during the block leaves `dest` as it was. The swap itself is two renames: a kill
    between them leaves no `dest` but the complete old one under a temp name, never a mixture."""
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f"{TEMP_PREFIX}{os.path.basename(dest)}.")
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        old = None
        if os.path.lexists(dest):
            old = tempfile.mkdtemp(dir=parent, prefix=f"{TEMP_PREFIX}{os.path.basename(dest)}.old.")
            os.rmdir(old)
            os.replace(dest, old)
        os.replace(tmp, dest)
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = _disk_full(e, dest)
        if err is e:
            raise
        raise err from e


def clean_temp_files(directory: str) -> list[str]:
    """Remove what killed writes left in `directory` (its TEMP_PREFIX files and folders); only
    safe while no other process writes there (hold its RunLock). Returns the names removed."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        if name.startswith(TEMP_PREFIX):
            path = os.path.join(directory, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)
            removed.append(name)
    return removed


class DirectoryLocked(RuntimeError):
    """Another live process holds the lock of this directory."""


class RunLock:
    """An exclusive lock on a directory for the life of one process (`with RunLock(d): ...`): the
    one lock of the repository, for a run's out_dir, a study's directory and a data set being
    prepared.

    It is an flock on `d/.lock` (or `d/name`): the kernel releases it when its holder dies, however
    it dies, so a lock left by a killed run is simply taken over. The file records the holder's pid
    and host for the error message a second run gets. With `wait` (a message to print), a second
    process waits for the first instead of failing, and locks the directory the first one leaves
    there (it may have replaced the whole directory)."""

    NAME = ".lock"

    def __init__(self, directory: str, name: str = NAME, wait: str | None = None):
        self.directory = directory
        self.path = os.path.join(directory, name)
        self.wait = wait
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl
        while True:
            os.makedirs(self.directory, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
            except FileNotFoundError:           # the directory was swapped away just now
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if self.wait is None:
                    holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise DirectoryLocked(
                        f"{self.directory} is in use by a running process ({holder}); wait for it to finish, "
                        "stop it, or choose another out_dir") from None
                print(self.wait, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:        # the holder we waited for may have replaced the directory: lock the new one's file
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)          # closing drops the flock; the file itself stays, harmless
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
