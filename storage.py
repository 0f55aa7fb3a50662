"""
Files that survive a crash, and the lock that keeps two runs out of one directory.

Every write goes to a temp file with a unique name in the destination's directory, is flushed
to disk (fsync), then renamed over the destination: a reader sees the old file or the new one,
never half of one, and a kill at any moment leaves at worst a temp file, which the next run in
that directory removes (clean_temp_files). On any failure, Ctrl-C and a full disk included, the
temp file is removed before the error goes on; a full disk becomes DiskFull with one clear line.
"""
from __future__ import annotations

import contextlib
import errno
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


class _RecordingWriter:
    """A file's write() that remembers the OSError it raised (see save_torch)."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, b) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj, path: str) -> None:
    """torch.save, atomically."""
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
