"""One process at a time per replicate folder.

A run holds an advisory lock (``flock``) on ``<seed folder>/run.lock`` while it writes there, with who holds it
(process id, host, start time, command) written into the file. A second process given the same experiment and
seed is refused at once, naming the first, instead of both writing the same checkpoints and rounds. The kernel
drops the lock when the holder ends, however it ends (Ctrl-C, a kill, a crash), so a stale lock cannot block a
resume, and :func:`lock_state` tells a live run from a stopped one (``sparse-lth ls`` shows it). Without
``fcntl`` (Windows) nothing is locked and the state is "unknown".
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import time
import warnings

try:
    import fcntl
except ImportError:  # pragma: no cover (not POSIX)
    fcntl = None

LOCK_NAME = "run.lock"


class RunInProgressError(RuntimeError):
    """Another live process holds the replicate folder's lock."""


def _holder_text(info: dict) -> str:
    parts = [f"pid {info.get('pid', '?')}"]
    if info.get("host"):
        parts.append(f"on {info['host']}")
    if info.get("since"):
        parts.append(f"since {info['since']}")
    text = " ".join(parts)
    return text + (f": {info['command']}" if info.get("command") else "")


def _command() -> str:
    """This process's command line, short: ``sparse-lth imp ...`` for a script, ``python3 -m pytest ...``."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    if len(argv) > 1 and not argv[1].startswith("-") and os.path.isfile(argv[1]):
        argv = argv[1:]  # an interpreter running a script (a console entry point): the script names it
    return " ".join([os.path.basename(argv[0]), *argv[1:]])


def _read(fd: int) -> dict:
    """The holder's record; {} if the file is empty or being rewritten (a reader can catch it half-written)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
        info = json.loads(raw.decode() or "{}")
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


class _NoLocks(Exception):
    """The filesystem does not lock (some network filesystems)."""


def _try_lock(fd: int, kind: int) -> bool:
    """True if taken, False if another process holds it; :class:`_NoLocks` where nothing can be locked."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise _NoLocks(str(e)) from None
        raise


@contextlib.contextmanager
def hold(seed_dir: str, patience: float = 1.0):
    """Hold ``seed_dir``'s lock for the ``with`` block; :class:`RunInProgressError` if a live process has it.
    ``patience``: seconds to keep trying first (a listing holds a shared lock for an instant to read the state)."""
    if fcntl is None:
        yield
        return
    os.makedirs(seed_dir, exist_ok=True)
    path = os.path.join(seed_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + patience
        try:
            taken = _try_lock(fd, fcntl.LOCK_EX)
        except _NoLocks as e:
            warnings.warn(f"cannot lock {path} ({e}): this filesystem does not lock, so nothing keeps a second "
                          "process from running the same replicate; start each run once", stacklevel=3)
            yield
            return
        while not taken:
            if time.monotonic() >= deadline:
                raise RunInProgressError(
                    f"{seed_dir} is being run by another process ({_holder_text(_read(fd))}). Two processes must "
                    f"not write one run: wait for that one to end or stop it (it resumes from its checkpoint).")
            time.sleep(0.05)
            taken = _try_lock(fd, fcntl.LOCK_EX)
        record = dict(pid=os.getpid(), host=socket.gethostname(),
                      since=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                      command=_command())
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        yield
    finally:
        os.close(fd)  # releases the lock; the record stays, as the last holder's


def lock_state(seed_dir: str) -> dict:
    """``dict(state=..., pid, host, since, command)`` of ``seed_dir``: state "running" (a live process holds the
    lock; the other fields say which), "stopped" (the last holder, named, has ended), or "unknown" (no lock file:
    never run by a version that locks, or no ``fcntl`` here)."""
    path = os.path.join(seed_dir, LOCK_NAME)
    if fcntl is None or not os.path.exists(path):
        return dict(state="unknown")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return dict(state="unknown")
    try:
        if _try_lock(fd, fcntl.LOCK_SH):
            info, state = _read(fd), "stopped"
            fcntl.flock(fd, fcntl.LOCK_UN)
        else:
            info, state = _read(fd), "running"
    except _NoLocks:
        return dict(state="unknown")
    finally:
        os.close(fd)
    return dict(state=state, **{k: info.get(k) for k in ("pid", "host", "since", "command")})


def describe(state: dict) -> str | None:
    """A few words for a listing: "running: pid 123 on host since ..." / "stopped" / None when unknown."""
    if state["state"] == "running":
        return "running: " + _holder_text({k: v for k, v in state.items() if k != "command"})
    if state["state"] == "stopped":
        return "stopped"
    return None
