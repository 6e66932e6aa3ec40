"""Export folders written so that nothing is lost or left behind, whatever stops the writer.

`write_atomically(OUT, ...)` (export, quantize, `export --precision`) guarantees:

* OUT is always either absent, the previous complete export, or the new complete export: the
  new one is built in a temporary folder beside OUT and published by one rename; an existing
  OUT is swapped with it atomically (Linux `renameat2(RENAME_EXCHANGE)`), or, where the
  filesystem cannot exchange (not Linux, NFS, ...), by two renames whose crash window is
  repaired by the next writer (it restores `.OUT.old-*` when OUT is missing). A real folder is
  kept at OUT rather than a symlink to versioned folders, so `cp -r`, `rsync`, `tar` and
  `scp` carry an export to a device as they would any folder.
* One writer per OUT: a `flock` on `.OUT.lock` beside OUT; a second export or quantize to the
  same OUT is refused at once (the kernel drops the lock of a killed process).
* Errors, Ctrl-C, SIGTERM and SIGHUP remove the temporary folders (the signals are turned into
  SystemExit(128 + signal) while writing, so the cleanup runs). SIGKILL and power loss cannot
  be handled: their temporary folders carry the owner's PID (in the name, and with host and
  process start time in `.flamingo-export-owner`), and the next writer of OUT removes those
  whose owner is gone.
* A full disk is an ExportError naming OUT and the free space, never an OSError traceback;
  where the size is known in advance it is refused before the slow part.
* The published folder gets the mode `mkdir` would give it (0777 & ~umask), not mkdtemp's 0700.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from runtime.errors import FlamingoExportError

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the rest still holds)
    fcntl = None  # type: ignore[assignment]

OWNER_FILE = ".flamingo-export-owner"
WORK_KINDS = ("tmp", "fp32", "old")  # temporary folders beside OUT: .OUT.<kind>-<pid>-<random>
_LOCKS_HELD: dict[str, int] = {}  # this process's OUT locks (re-entered by nested writers)
T = TypeVar("T")
Progress = Callable[[str], None]


class ExportError(FlamingoExportError, RuntimeError):
    """The export cannot proceed (bad option, existing output, unwritable folder, ...)."""


def _quiet(_message: str) -> None:
    pass


# ------------------------------------------------------------------ signals


@contextlib.contextmanager
def unwinding_signals() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise SystemExit(128 + signal) in the main thread (as
    Ctrl-C raises KeyboardInterrupt), so `finally` and `except BaseException` cleanups run;
    a repeated signal is ignored until the cleanup is over. Signals whose handler is not the
    default (ignored under nohup, or set by the application) are left alone; outside the main
    thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    replaced: dict[int, Any] = {}

    def handler(signum: int, _frame: Any) -> None:
        for sig in replaced:
            signal.signal(sig, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            replaced[sig] = signal.SIG_DFL
            signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in replaced.items():
            signal.signal(sig, previous)


# ------------------------------------------------------------------ owners of temporary folders


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 of proc(5)


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start_time": _start_time(pid)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _work_folder_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.({'|'.join(WORK_KINDS)})-(\d+)-")


def make_work_folder(out: Path, kind: str) -> Path:
    """A fresh folder `.OUT.<kind>-<pid>-<random>` beside OUT, owned by this process."""
    out = Path(out).absolute()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    (tmp / OWNER_FILE).write_text(json.dumps(_owner()) + "\n")
    return tmp


def _stale(folder: Path, pid: int) -> bool | None:
    """True: its owner is gone (safe to remove); False: the owner runs; None: cannot tell
    (another host's folder)."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        owner = {}
    if not isinstance(owner, dict):
        owner = {}
    if owner.get("host", socket.gethostname()) != socket.gethostname():
        return None
    if not _alive(pid):
        return True
    started = owner.get("start_time")
    return started is not None and started != _start_time(pid)  # the PID was reused


def reclaim_stale(out: Path, say: Progress = _quiet) -> list[Path]:
    """Remove the temporary folders beside OUT left by writers that were killed (SIGKILL,
    power loss); if OUT is missing and a killed writer left the previous export in
    `.OUT.old-*`, put it back. Call with OUT's lock held. Returns what was removed."""
    out = Path(out).absolute()
    pattern = _work_folder_pattern(out.name)
    try:
        entries = sorted(out.parent.iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        kind, pid = match[1], int(match[2])
        stale = _stale(entry, pid)
        if stale is None:
            say(f"note: {entry} belongs to a writer on another host; left in place")
            continue
        if not stale:
            continue
        if kind == "old" and not os.path.lexists(out):
            os.rename(entry, out)
            say(f"restored {out} from {entry.name} (a writer was killed while replacing it)")
            continue
        shutil.rmtree(entry, ignore_errors=True)
        say(f"removed {entry.name}, left by a killed writer (pid {pid})")
        removed.append(entry)
    return removed


# ------------------------------------------------------------------ one writer per OUT


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _holder(lock: Path) -> str:
    try:
        return f" (pid {int(lock.read_text().split()[0])})"
    except (OSError, ValueError, IndexError):
        return ""


def _busy(out: Path, lock: Path) -> ExportError:
    return ExportError(
        f"{out} is being written by another flamingo-export{_holder(lock)}; wait for it to "
        "finish or choose another --output"
    )


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold OUT's writer lock (`flock` on `.OUT.lock`, removed on release); ExportError at once
    if another process holds it. Re-entrant within a process."""
    out = Path(out).absolute()
    key = str(out)
    if key in _LOCKS_HELD or fcntl is None:
        _LOCKS_HELD[key] = _LOCKS_HELD.get(key, 0) + 1
        try:
            yield
        finally:
            _LOCKS_HELD[key] -= 1
            if not _LOCKS_HELD[key]:
                del _LOCKS_HELD[key]
        return
    lock = _lock_path(out)
    deadline = time.monotonic() + 1.0  # another process's `_probe_lock` holds it for microseconds
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise _busy(out, lock) from None
            time.sleep(0.05)
            continue
        # the holder before us may have unlinked the file it locked: lock the current one
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCKS_HELD[key] = 1
    try:
        yield
    finally:
        del _LOCKS_HELD[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # while still locked: a waiter re-checks the inode
        os.close(fd)


def _probe_lock(out: Path) -> None:
    """Refuse early (before slow work) when another process holds OUT's lock."""
    lock = _lock_path(out)
    if fcntl is None or str(out) in _LOCKS_HELD or not lock.exists():
        return
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(out, lock) from None
    finally:
        os.close(fd)


# ------------------------------------------------------------------ publishing


def current_umask() -> int:
    """The process umask (from /proc where possible: reading it with os.umask sets it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2): True when done; False when this system or filesystem cannot (not
    Linux, glibc < 2.28, EINVAL from NFS/FUSE...); OSError for a real failure."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]  # fmt: skip
    if function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def publish(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at OUT: at every instant OUT is the old export or the new
    one (see the module docstring); then remove the old one."""
    out = Path(out).absolute()
    (tmp / OWNER_FILE).unlink(missing_ok=True)
    os.chmod(tmp, 0o777 & ~current_umask())
    if not os.path.lexists(out):
        if not renameat2(tmp, out, RENAME_NOREPLACE):
            os.rename(tmp, out)
        return
    if renameat2(tmp, out, RENAME_EXCHANGE):
        _remove(tmp)  # the old export, now at the temporary name
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    old.rmdir()  # a unique name for the old export (restored by reclaim_stale after a crash)
    os.rename(out, old)
    os.rename(tmp, out)
    _remove(old)


# ------------------------------------------------------------------ the whole write


def check_output(out: Path, force: bool, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse, before any slow work, an OUT that exists (without `force`), is not a folder, is
    being written by another process, is a symbolic link (replacing it would drop the link,
    not write where it points), is the current folder or one holding it (`-o ''`, `-o .`:
    replacing it would delete what the user works in), or is or holds one of `inputs` (the
    files being read: `--force` would delete them)."""
    out = Path(out).absolute()
    if out.is_symlink():
        raise ExportError(
            f"{out} is a symbolic link (to {os.readlink(out)}); give the folder it names instead"
        )
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents or real == Path.home().resolve():
        raise ExportError(
            f"{out} is the current folder or a folder holding it (or the home folder); "
            "write the export to a folder of its own"
        )
    for source in inputs:
        for path in _read_targets(Path(source)):
            if path == real or real in path.parents:
                raise ExportError(
                    f"{out} holds the input {source}"
                    + (f" (its file {path})" if path != Path(source).absolute().resolve() else "")
                    + ": write the export to a folder of its own"
                )
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    _probe_lock(out)


def _read_targets(source: Path) -> list[Path]:
    """Where the files an input names really are: the input itself and, for a folder, every
    entry in it (and in its subfolders) with symbolic links followed: a Hugging Face cache
    snapshot's files are links into its blobs/ folder, which an OUT must not replace."""
    top = source.absolute().resolve()
    found = [top]
    if source.is_dir():
        for root, dirs, files in os.walk(source, followlinks=False):
            found += [(Path(root) / n).resolve() for n in (*dirs, *files)]
    return found


def writable_parent(out: Path) -> Path:
    """OUT's parent folder, created if needed; ExportError if it cannot be written."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {parent}: {e.strerror}") from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"{parent} is not writable")
    return parent


def check_free_space(out: Path, needed: int, what: str = "the export") -> None:
    """ExportError now, rather than a full disk later, when OUT's filesystem has less than
    `needed` bytes free."""
    out = Path(out).absolute()
    parent = next((p for p in (out.parent, *out.parents) if p.exists()), out.parent)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise ExportError(
            f"not enough space for {out}: {what} needs about {needed / 2**20:.1f} MiB, "
            f"{parent} has {free / 2**20:.1f} MiB free"
        )


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_error(out: Path, tmp: Path | None, e: OSError) -> ExportError:
    """An OSError while writing OUT as a one-line ExportError (full disk: how much was written
    and how much is free)."""
    detail = e.strerror or str(e)
    if e.errno in _NO_SPACE:
        parent = Path(out).absolute().parent
        wrote = _tree_size(tmp) if tmp is not None and tmp.exists() else 0
        free = shutil.disk_usage(parent).free if parent.exists() else 0
        detail = (
            f"{detail} (wrote {wrote / 2**20:.1f} MiB before it failed; {free / 2**20:.1f} MiB "
            f"free on {parent})"
        )
    return ExportError(f"cannot write {out}: {detail}")


def write_atomically(
    out: Path, force: bool, build: Callable[[Path], T], say: Progress = _quiet
) -> T:
    """Run build(tmp) in a fresh folder beside OUT, then publish it at OUT (see the module
    docstring for what is guaranteed on errors, signals and kills). Export and quantize."""
    out = Path(out).absolute()
    writable_parent(out)
    with unwinding_signals(), output_lock(out):
        check_output(out, force)
        reclaim_stale(out, say)
        tmp = make_work_folder(out, "tmp")
        try:
            result = build(tmp)
            publish(tmp, out)
        except OSError as e:
            error = write_error(out, tmp, e) if _is_write_error(e, out, tmp) else None
            shutil.rmtree(tmp, ignore_errors=True)
            if error is None:
                raise
            raise error from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    say(f"wrote {out}")
    return result


def _is_write_error(e: OSError, out: Path, tmp: Path) -> bool:
    """A failure to write (full disk, quota, read-only...) or inside the folders being written,
    rather than a failure to read an input."""
    if e.errno in (*_NO_SPACE, errno.EROFS, errno.EIO):
        return True
    names = [n for n in (e.filename, e.filename2) if isinstance(n, str)]
    return any(Path(n).absolute().is_relative_to(p) for n in names for p in (tmp, out))
