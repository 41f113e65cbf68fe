"""Exclusive locks: one d2r run at a time on an output or a work directory.

A lock is a small JSON file beside what it guards (``sr.zarr`` -> ``sr.zarr.d2r-lock``)
naming its holder: host, PID, the process's start tick and the wall-clock start time.
It appears atomically with its content (written to a private file, then hard-linked
to the lock's name, which fails if the name exists), so a reader never sees half a lock.

* A second run on the same target is refused with :class:`~d2r_dask.errors.LockedError`
  naming the holder.
* A lock left by a process that is gone (same host; PID not running, or running but
  started at another tick, i.e. reused) is stale: it is taken over with a warning.
* A lock from another host cannot be checked from here; the message says which file
  to delete if that run has stopped.

On an object store (``s3://bucket/sr.zarr`` -> ``s3://bucket/sr.zarr.d2r-lock``) the lock
is an object created by a conditional PUT (``If-None-Match``: it fails if the object
exists), and a stale one is deleted after re-reading it, then created again.

Locks are re-entrant within a process: :func:`~d2r_dask.stages.pipeline.run` holds its
output's lock while the engine takes it again for Stage IV. The lock sits beside the
target, not inside it, so ``--overwrite`` can delete the target while the lock holds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ..errors import LockedError
from ..io import stores
from ..io.stores import Location
from ..io.volume import check_output_path

log = logging.getLogger(__name__)

SUFFIX = ".d2r-lock"
_HELD: dict[Location, int] = {}  # lock file -> nesting depth, in this process
_GUARD = threading.Lock()
F = TypeVar("F", bound=Callable[..., Any])


def lock_path(target: str | os.PathLike) -> Location:
    """The lock file of ``target``: beside it, its name plus ``.d2r-lock`` (an object beside a remote target)."""
    loc = stores.location(target)
    if isinstance(loc, str):
        return loc + SUFFIX
    loc = loc.absolute()
    return loc.with_name(loc.name + SUFFIX)


def _process_start(pid: int) -> str | None:
    """The start tick of process ``pid`` (Linux ``/proc``), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of stat(5); fields here start at field 3


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)[:300]}


def _read(path: Location) -> dict[str, Any] | None:
    """The holder recorded in ``path``; None if the file vanished; {} if it is unreadable."""
    try:
        data = json.loads(stores.read_bytes(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the holder (on this host) still runs: its PID exists and started at the recorded tick."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    start, now = holder.get("process_start"), _process_start(pid)
    return start is None or now is None or start == now


def _holder_text(holder: dict[str, Any]) -> str:
    return (f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
            + (f" ({holder['command']})" if holder.get("command") else ""))


def _try_create(path: Location, me: dict[str, Any]) -> bool:
    """Create ``path`` holding ``me`` if it does not exist (atomically, content included)."""
    if isinstance(path, str):
        return stores.create_exclusive(path, json.dumps(me).encode())
    tmp = path.with_name(f"{path.name}.{me['pid']}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(me))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: exclusive creation, then the content
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(path: Location, stale: dict[str, Any], target: Location, what: str) -> None:
    """Remove the stale lock ``path`` if it still holds ``stale`` (another run may have taken it over first)."""
    if isinstance(path, str):  # an object store renames nothing: re-read, then delete
        if _read(path) != stale:
            return
        stores.remove(path)
        log.warning("taking over the lock of %s %s: it was left by %s, which is no longer running", what, target,
                    _holder_text(stale))
        return
    moved = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return  # someone else removed it: try again
    if _read(moved) != stale:  # not the lock we judged: put it back
        with contextlib.suppress(OSError):
            os.link(moved, path)
        moved.unlink(missing_ok=True)
        return
    moved.unlink(missing_ok=True)
    log.warning("taking over the lock of %s %s: it was left by %s, which is no longer running", what, target,
                _holder_text(stale))


def acquire(target: str | os.PathLike, *, what: str = "output") -> Location:
    """Take ``target``'s lock (re-entrant in this process) or raise :class:`LockedError`."""
    target = stores.location(target)
    path = lock_path(target)
    with _GUARD:
        if path in _HELD:
            _HELD[path] += 1
            return path
        if isinstance(path, Path):
            path.parent.mkdir(parents=True, exist_ok=True)
        else:
            stores.check_bucket(path)
        me = _me()
        for _ in range(5):
            if _try_create(path, me):
                _HELD[path] = 1
                return path
            holder = _read(path)
            if holder is None:
                continue  # released meanwhile
            if not holder:
                raise LockedError(f"{what} {target} has an unreadable lock file {path}; if no d2r run is using "
                                  f"{target}, delete that file and rerun")
            if holder.get("host") != me["host"]:
                raise LockedError(f"{what} {target} is in use by another d2r run: {_holder_text(holder)}; this "
                                  f"machine cannot check it: if that run has stopped, delete {path} and rerun")
            if _alive(holder):
                raise LockedError(f"{what} {target} is in use by another d2r run: {_holder_text(holder)}; wait for "
                                  "it to finish (or stop it) and rerun, or choose another output")
            _take_over(path, holder, target, what)
        raise LockedError(f"could not take the lock {path} of {what} {target} (other runs keep taking it); rerun")


def release(target: str | os.PathLike) -> None:
    """Release a lock taken by :func:`acquire` (the file goes when the outermost holder releases)."""
    path = lock_path(target)
    with _GUARD:
        depth = _HELD.get(path, 0)
        if depth > 1:
            _HELD[path] = depth - 1
            return
        _HELD.pop(path, None)
        holder = _read(path)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            stores.remove(path)


@contextlib.contextmanager
def exclusive(target: str | os.PathLike, *, what: str = "output") -> Iterator[Location]:
    """Hold ``target``'s lock for the ``with`` block."""
    path = acquire(target, what=what)
    try:
        yield path
    finally:
        release(target)


def locks_output(fn: F) -> F:
    """Run ``fn(source, output, ...)`` holding ``output``'s lock.

    ``output`` is first checked against ``source``, so a lock file is never made inside an input.
    """

    @functools.wraps(fn)
    def wrapper(source: Any, output: Any, *args: Any, **kwargs: Any) -> Any:
        check_output_path(output, [source])
        with exclusive(output):
            return fn(source, output, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
