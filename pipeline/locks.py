"""Lock files: one inkpipe process writes a store or a run folder at a time.

A writer creates its lock file with ``O_CREAT | O_EXCL`` (the file system decides atomically
who creates it first) and writes into it who it is: pid, host, the start time of that process
and of the lock, the command and a random token. It deletes the file when it is done, also
after an error or Ctrl-C. Another writer finding the file gets a :class:`LockedError` naming
the file, its owner and how to clear it.

A process killed with ``kill -9`` cannot delete its lock. Such a *stale* lock is recognised
when the owner ran on this host and its pid is gone, a zombie, or now belongs to a process
started after the lock (the pid was reused); the next writer takes it over with a message.
A lock from another host is never taken over: this host cannot tell whether its owner is
alive, so the message tells the user to delete the file once that process is gone. A lock
file that cannot be read is stale once it is older than :data:`UNREADABLE_GRACE_S` (its
writer may be between creating and filling it).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import LockedError

__all__ = ["UNREADABLE_GRACE_S", "LockOwner", "hold_lock", "read_lock"]

UNREADABLE_GRACE_S = 10.0  # an unreadable lock younger than this may still be being written
_START_SLACK_S = 1.0  # process start times are known to about a clock tick


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock (the JSON content of a lock file).

    Attributes:
        pid: process id; host: ``socket.gethostname()`` of that process.
        process_started: the process's start time (Unix seconds), to detect reused pids.
        locked_at: when the lock was taken (Unix seconds).
        command: what the owner is doing (``"inkpipe ingest"``).
        token: random, tells this lock from a later one of the same process.
    """

    pid: int
    host: str
    process_started: float
    locked_at: float
    command: str
    token: str

    @classmethod
    def me(cls, command: str) -> LockOwner:
        """Describe the calling process."""
        pid = os.getpid()
        return cls(pid, _host(), _process_started(pid) or time.time(), time.time(), command, "")

    def describe(self) -> str:
        """Return e.g. ``"'inkpipe ingest' (pid 123 on host a, since 2025-01-31 12:00:00)"``."""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.locked_at))
        return f"'{self.command}' (pid {self.pid} on host {self.host}, since {since})"


def _host() -> str:
    return socket.gethostname()


def _proc_stat(pid: int) -> list[str] | None:
    """Return the fields of ``/proc/<pid>/stat`` after the command name (Linux), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()  # the command name may hold spaces and ')'


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def _process_started(pid: int) -> float | None:
    """Return when process ``pid`` started (Unix seconds; Linux ``/proc``), or None if unknown."""
    fields, boot = _proc_stat(pid), _boot_time()
    if fields is None or boot is None:
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start, clock ticks


def read_lock(path: Path) -> LockOwner | None:
    """Return the owner written in a lock file, or None if it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return LockOwner(
            pid=int(data["pid"]),
            host=str(data["host"]),
            process_started=float(data["process_started"]),
            locked_at=float(data["locked_at"]),
            command=str(data["command"]),
            token=str(data["token"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_alive(owner: LockOwner) -> bool:
    """Whether the owner (on this host) still runs: same pid, not a zombie, not a newer process.

    Without ``/proc`` (not Linux) only the pid is checked.
    """
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    except OSError:
        return True
    fields = _proc_stat(owner.pid)
    if fields is not None and fields[0] == "Z":  # killed, not yet reaped by its parent
        return False
    started = _process_started(owner.pid)
    return started is None or started <= owner.process_started + _START_SLACK_S


def _stale_reason(path: Path, owner: LockOwner | None) -> str | None:
    """Return why the lock at ``path`` is stale, or None if it must be respected."""
    if owner is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return "gone"
        return f"unreadable and {age:.0f} s old" if age > UNREADABLE_GRACE_S else None
    if owner.host != _host():
        return None
    if owner.pid == os.getpid() and owner.process_started == _process_started(os.getpid()):
        return None  # this very process holds it (a nested writer): not stale, refuse
    if not _is_alive(owner):
        return f"pid {owner.pid} no longer runs on this host"
    return None


def _create(path: Path, owner: LockOwner) -> bool:
    """Create the lock file holding ``owner``; False if it exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, (json.dumps(asdict(owner)) + "\n").encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


def _take_over(path: Path, seen: bytes) -> None:
    """Remove the stale lock at ``path`` if it still holds ``seen``.

    The lock is first renamed aside (one process wins the rename); if what was renamed is not
    what was judged stale, another process took the lock over in between, and it is put back.
    """
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # someone else removed it first
    try:
        if aside.read_bytes() != seen:
            with contextlib.suppress(OSError):
                os.link(aside, path)  # fails if yet another lock appeared: that one stands
    finally:
        aside.unlink(missing_ok=True)


def _acquire(path: Path, target: str, command: str, log: Callable[[str], None]) -> LockOwner:
    owner = LockOwner.me(command)
    owner = LockOwner(**{**asdict(owner), "token": secrets.token_hex(8)})
    for _ in range(5):  # a few rounds: another process may take over or release meanwhile
        if _create(path, owner):
            return owner
        try:
            seen = path.read_bytes()
        except FileNotFoundError:
            continue  # released just now
        held = read_lock(path)
        reason = _stale_reason(path, held)
        if reason is None:
            who = held.describe() if held is not None else "another process (lock being written)"
            same_host = held is None or held.host == _host()
            clear = (
                f"wait for it to finish (or stop it), then run again; if no such process runs, "
                f"delete {path}"
                if same_host
                else f"if that process is gone, delete {path} and run again"
            )
            raise LockedError(f"{target} is locked by {who}; {clear}")
        if reason != "gone":
            what = held.describe() if held is not None else "an unknown process"
            log(f"taking over the stale lock {path} of {what}: {reason}")
        _take_over(path, seen)
    raise LockedError(
        f"could not take the lock {path}: other processes keep taking it; run one writer at a time"
    )


@contextlib.contextmanager
def hold_lock(
    path: Path, target: str, command: str, log: Callable[[str], None] = print
) -> Iterator[LockOwner]:
    """Hold the lock file ``path`` for the ``with`` block; delete it afterwards.

    Args:
        path: the lock file (its folder must exist).
        target: what the lock protects, for messages (``"store data/store.zarr"``).
        command: what the holder does, shown to a second writer (``"inkpipe ingest"``).
        log: where the take-over of a stale lock (or the loss of this one) is reported.

    Yields:
        The :class:`LockOwner` written into the file.

    Raises:
        LockedError: another live process holds the lock (the message says how to clear it).
    """
    path = Path(path)
    owner = _acquire(path, target, command, log)
    try:
        yield owner
    finally:
        held = read_lock(path)
        if held is not None and held.token == owner.token:
            path.unlink(missing_ok=True)
        elif held is not None:  # someone took it over while we ran: theirs now, leave it
            log(f"warning: the lock {path} was taken over by {held.describe()} meanwhile")
