"""Files: writing so that nothing already there is lost (a unique temporary file, fsync, then a
rename), one writer per directory (an OS lock), OS errors that name the path and the cause,
reading JSONL with errors that name the file and line, and UTF-8 decoding that counts bad bytes."""

from __future__ import annotations

import codecs
import errno
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import BusyError, DataError, PsannError, StorageError


def temp_name(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A sibling of `path` no other process or call uses: `.<name>.<tag>-<pid>-<random>`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in directory `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under `root` (before the rename that publishes it)."""
    root = Path(root)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path`: a reader, or a crash midway, never sees half a file,
    and once this returns the new content is on disk. The mode is a new file's (0o666 less the umask)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise_os_error(exc, path, "writing")
        raise
    fsync_dir(path.parent)
    return path


def raise_os_error(exc: OSError, path: str | os.PathLike, doing: str = "writing") -> None:
    """Re-raise an OSError as a StorageError naming the path, the cause and the fix (ENOSPC, EACCES,
    EROFS, EDQUOT); other errors pass through unchanged."""
    if isinstance(exc, PsannError):
        raise exc
    path = Path(path)
    where = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(where).free
        error = StorageError(f"disk full while {doing} {path}: {free:,} bytes free in {where}. Free some space "
                             "(or choose another directory) and run the command again; what was already written "
                             "is intact.")
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause = "the file system is read-only" if exc.errno == errno.EROFS else "permission denied"
        error = StorageError(f"cannot write {path}: {cause} ({exc.filename or where}) while {doing}. Choose a "
                             "directory you can write to, or fix its permissions.")
    else:
        raise exc
    error.errno = exc.errno
    raise error from None


class DirectoryLock:
    """An exclusive OS lock (flock) on `directory/.lock`, held while one process writes there.

    A second holder fails at once, naming the first (pid, host, start time). The kernel drops the
    lock when its process dies, so a lock file left by a killed process never blocks."""

    _held: dict[str, int] = {}  # lock files this process holds -> nesting depth (flock is per open file)

    def __init__(self, directory: str | os.PathLike, what: str = "run"):
        self.directory, self.what = Path(directory), what
        self.path = self.directory / ".lock"
        self._fd: int | None = None
        self._nested = False

    def acquire(self) -> "DirectoryLock":
        key = str(self.path.resolve())
        if key in self._held:  # the same process, one level down (the CLI and then the trainer)
            self._held[key] += 1
            self._nested = True
            return self
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise_os_error(exc, self.path, f"locking the {self.what} directory")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise BusyError(f"{self.directory} is in use by another {self.what} ({holder}); wait for it to "
                             f"finish, stop it, or choose another directory.") from None
        try:  # who holds it, for the message a second process gets
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        except OSError as exc:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise_os_error(exc, self.path, f"locking the {self.what} directory")
        self._fd = fd
        self._held[key] = 1
        return self

    def release(self) -> None:
        key = str(self.path.resolve())
        if self._nested:
            self._held[key] -= 1
            self._nested = False
        elif self._fd is not None:
            self._held.pop(key, None)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_json(path: str | os.PathLike, error: type[PsannError], what: str = "file") -> Any:
    """JSON from `path`; a missing, unreadable, non-UTF-8 or truncated file is `error` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} not found: {path}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not a valid {what} ({exc}); it is corrupt or truncated.") from None


def jsonl_rows(lines: Iterable[str], path: str | os.PathLike, hint: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line; a line that is not JSON stops with
    "<path>:<line> is not valid JSON (...); <hint>"."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number} is not valid JSON ({exc.msg}); {hint}") from None


class CountingDecoder:
    """Incremental UTF-8 decoding that replaces invalid bytes with U+FFFD and counts them (`bad`),
    remembering the file offset of the first (`first_bad`, -1 when none)."""

    def __init__(self):
        self.bad, self.first_bad = 0, -1
        self._offset = 0  # file offset of the first byte of the buffer being decoded
        self.errors = f"psann_count_{id(self)}"  # a codec error handler of our own

        def handler(exc: UnicodeDecodeError):
            if self.bad == 0:
                self.first_bad = self._offset + exc.start
            self.bad += 1
            return "\ufffd", exc.end

        codecs.register_error(self.errors, handler)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=self.errors)

    def decode(self, data: bytes, final: bool = False) -> str:
        pending = len(self._decoder.getstate()[0])  # bytes of a character cut by the previous block
        self._offset -= pending
        text = self._decoder.decode(data, final)
        self._offset += pending + len(data)
        return text
