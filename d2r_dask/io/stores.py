"""Where a volume lives: a local path or an object-store URL, and its small files.

Every volume argument of d2r is a *location*: a local path (``lr.zarr``,
``file:///data/lr.zarr``) or a URL of an object store (``s3://bucket/lr.zarr``,
``gs://bucket/lr.zarr``). :func:`location` parses it once: a local one becomes a
:class:`~pathlib.Path` (and everything works on it exactly as on any path), a remote
one stays its URL string. The helpers here (exists, read, write, list, remove,
exclusive create) do the same thing on both, so the job state, done-state and locks
that d2r keeps beside an output work on an object store too. Voxels go through Zarr
(:func:`d2r_dask.io.volume` opens a remote location as a ``zarr.storage.FsspecStore``,
:func:`fs_url`).

Credentials and endpoints come from the environment as the storage libraries read it
(for S3: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_PROFILE``,
``AWS_ENDPOINT_URL`` for an S3-compatible service, ~/.aws; for GCS:
``GOOGLE_APPLICATION_CREDENTIALS``; any fsspec option as ``FSSPEC_S3_<OPTION>``).

On an object store a write of one object is atomic (it appears whole or not at all),
there is no append and no rename: :func:`write_bytes` is a single PUT, and
:func:`create_exclusive` a conditional PUT (``If-None-Match``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Union

from ..errors import InputError
from .files import atomic_write

Location = Union[Path, str]
"""A local :class:`~pathlib.Path` or the URL (``scheme://bucket/key``) of an object."""

REMOTE_SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
"""Object-store schemes d2r reads and writes, and the package each needs."""

STORAGE_OPTIONS: dict[str, Any] = {"use_listings_cache": False}
"""Options d2r adds to the environment's: no cached listings, since workers in other
processes add objects (done-state, chunks) that a listing must see."""


def scheme(path: str | os.PathLike) -> str | None:
    """The URL scheme of ``path`` (``"s3"``, ``"file"``), or None for a plain path."""
    text = os.fspath(path)
    head, sep, _ = text.partition("://")
    return head.lower() if sep and head and "/" not in head else None


def location(path: str | os.PathLike) -> Location:
    """``path`` as a location: a :class:`~pathlib.Path` if it is local (a plain path or
    ``file://``), else its URL without a trailing slash; an unknown scheme is an InputError."""
    if isinstance(path, Path):
        return path
    text = os.fspath(path)
    s = scheme(text)
    if s is None:
        return Path(text)
    if s == "file":
        return Path(text[len("file://"):])
    if s not in REMOTE_SCHEMES:
        raise InputError(
            f"{text}: unknown storage scheme {s!r}; give a local path, file://, "
            f"{', '.join(f'{k}://' for k in REMOTE_SCHEMES)}"
        )
    key = text.partition("://")[2].strip("/")
    if not key:
        raise InputError(f"{text}: name a bucket (and a key inside it), e.g. {s}://bucket/volume.zarr")
    return f"{s}://{key}"


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is on an object store (not a local file system)."""
    return isinstance(location(path), str)


def join(path: str | os.PathLike, *parts: str) -> Location:
    """``path / part / ...`` for a local path or a URL."""
    loc = location(path)
    if isinstance(loc, Path):
        return loc.joinpath(*parts)
    return "/".join([loc, *(p.strip("/") for p in parts)])


def name(path: str | os.PathLike) -> str:
    """The last part of ``path`` (``sr.zarr``)."""
    loc = location(path)
    return loc.name if isinstance(loc, Path) else loc.rsplit("/", 1)[-1]


def parent(path: str | os.PathLike) -> Location:
    """The location holding ``path`` (a bucket's parent is the bucket)."""
    loc = location(path)
    if isinstance(loc, Path):
        return loc.resolve().parent
    head, _, key = loc.partition("://")
    return f"{head}://{key.rsplit('/', 1)[0]}" if "/" in key else loc


def canonical(path: str | os.PathLike) -> str:
    """One spelling per location: the resolved absolute path, or the URL (job identity, comparisons)."""
    loc = location(path)
    return str(loc.resolve()) if isinstance(loc, Path) else loc


def same_or_inside(a: str | os.PathLike, b: str | os.PathLike, containing: bool = True) -> bool:
    """Whether ``a`` is ``b``, lies inside it, or (``containing``) holds it."""
    ca, cb = canonical(a), canonical(b)
    if isinstance(location(a), Path) != isinstance(location(b), Path):
        return False
    if isinstance(location(a), Path):
        pa, pb = Path(ca), Path(cb)
        return pa == pb or pb in pa.parents or (containing and pa in pb.parents)
    return ca == cb or ca.startswith(cb + "/") or (containing and cb.startswith(ca + "/"))


# --- the file system behind a remote location ------------------------------------------


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec file system, path inside it)`` for a remote URL; a missing package is an InputError."""
    import fsspec

    s = scheme(url) or ""
    try:
        fs = fsspec.filesystem(s, **STORAGE_OPTIONS)
    except ImportError as exc:
        raise InputError(
            f"{url}: reading and writing {s}:// needs the package {REMOTE_SCHEMES.get(s, s)}: "
            "pip install 'd2r-dask[cloud]'"
        ) from exc
    return fs, url.partition("://")[2]


def fs_url(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``(url, storage_options)`` to open a remote location with Zarr's ``FsspecStore.from_url``
    (:data:`STORAGE_OPTIONS`; the rest comes from the environment); checks the package."""
    loc = location(path)
    if isinstance(loc, Path):
        raise ValueError(f"{loc} is a local path")
    filesystem(loc)
    return loc, dict(STORAGE_OPTIONS)


def _remote_error(url: str, exc: BaseException, doing: str) -> InputError:
    return InputError(
        f"{url}: cannot {doing} ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
        "check the URL, the bucket, the credentials (e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) "
        "and the endpoint (AWS_ENDPOINT_URL)"
    )


def check_bucket(path: str | os.PathLike) -> None:
    """Refuse (InputError naming the URL) a remote location whose bucket does not exist
    or cannot be reached; a local path passes."""
    loc = location(path)
    if isinstance(loc, Path):
        return
    fs, key = filesystem(loc)
    bucket = key.split("/", 1)[0]
    try:
        found = fs.exists(bucket)
    except Exception as exc:  # credentials, endpoint, permissions: one clear error
        raise _remote_error(loc, exc, "reach its bucket") from exc
    if not found:
        raise InputError(f"{loc}: the bucket {scheme(loc)}://{bucket} does not exist (or is not visible with "
                         "these credentials); create it first or check the URL")


# --- small files, on both ---------------------------------------------------------------


def exists(path: str | os.PathLike) -> bool:
    """Whether anything (a file, a folder, an object or a prefix of objects) is at ``path``."""
    loc = location(path)
    if isinstance(loc, Path):
        return loc.exists() or loc.is_symlink()
    fs, key = filesystem(loc)
    try:
        return bool(fs.exists(key))
    except Exception as exc:
        raise _remote_error(loc, exc, "look it up") from exc


def is_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder (locally, not a link to one) or a prefix holding objects."""
    loc = location(path)
    if isinstance(loc, Path):
        return loc.is_dir() and not loc.is_symlink()
    fs, key = filesystem(loc)
    return bool(fs.isdir(key))


def is_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file or an object."""
    loc = location(path)
    if isinstance(loc, Path):
        return loc.is_file()
    fs, key = filesystem(loc)
    return bool(fs.isfile(key))


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes at ``path`` (FileNotFoundError if there are none)."""
    loc = location(path)
    if isinstance(loc, Path):
        return loc.read_bytes()
    fs, key = filesystem(loc)
    return bytes(fs.cat_file(key))


def write_bytes(path: str | os.PathLike, data: bytes) -> Location:
    """Write ``data`` atomically: a temporary file renamed (local) or one PUT (object store)."""
    loc = location(path)
    if isinstance(loc, Path):
        return atomic_write(loc, lambda tmp: tmp.write_bytes(data))
    fs, key = filesystem(loc)
    fs.pipe_file(key, data)
    return loc


def create_exclusive(path: str | os.PathLike, data: bytes) -> bool:
    """Create the object ``path`` holding ``data`` unless it exists (a conditional PUT);
    True if this call created it. Remote only: local locks keep their hard-link protocol."""
    loc = location(path)
    if isinstance(loc, Path):
        raise ValueError(f"{loc} is a local path")
    fs, key = filesystem(loc)
    try:
        fs.pipe_file(key, data, mode="create")
    except FileExistsError:
        return False
    return True


def entries(path: str | os.PathLike) -> list[tuple[Location, bool]]:
    """``(location, is_folder)`` of what ``path`` holds, one listing (no recursion);
    [] if ``path`` is no folder. Locally a link to a folder does not count as a folder."""
    loc = location(path)
    if isinstance(loc, Path):
        try:
            with os.scandir(loc) as it:
                return [(Path(e.path), e.is_dir(follow_symlinks=False)) for e in it]
        except (NotADirectoryError, FileNotFoundError):
            return []
    fs, key = filesystem(loc)
    try:
        listed = fs.ls(key, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    head = loc.partition("://")[0]
    out = []
    for info in listed:
        child = str(info["name"]).rstrip("/")
        if child != key:  # some listings include the prefix itself
            out.append((f"{head}://{child}", info.get("type") == "directory"))
    return out


def size(path: str | os.PathLike) -> int | None:
    """Bytes of the file or object at ``path``, None if there is none."""
    loc = location(path)
    if isinstance(loc, Path):
        try:
            return loc.stat().st_size
        except FileNotFoundError:
            return None
    fs, key = filesystem(loc)
    try:
        return int(fs.size(key))
    except FileNotFoundError:
        return None


def make_dirs(path: str | os.PathLike) -> None:
    """Create the folder ``path`` and its parents; nothing to do on an object store (prefixes
    exist as soon as an object is under them)."""
    loc = location(path)
    if isinstance(loc, Path):
        loc.mkdir(parents=True, exist_ok=True)


def remove(path: str | os.PathLike, *, missing_ok: bool = True) -> None:
    """Delete the file, folder (recursively) or objects at ``path``."""
    loc = location(path)
    if isinstance(loc, Path):
        import shutil

        if loc.is_dir() and not loc.is_symlink():
            shutil.rmtree(loc, ignore_errors=missing_ok)
        else:
            loc.unlink(missing_ok=missing_ok)
        return
    fs, key = filesystem(loc)
    try:
        fs.rm(key, recursive=True)
    except FileNotFoundError:
        if not missing_ok:
            raise


def remove_files(paths: Iterable[Location]) -> None:
    """Delete many files or objects (missing ones are fine): object stores in batched requests."""
    remote: dict[str, list[str]] = {}
    for p in paths:
        loc = location(p)
        if isinstance(loc, Path):
            loc.unlink(missing_ok=True)
        else:
            remote.setdefault(scheme(loc) or "", []).append(loc)
    for urls in remote.values():
        fs, _ = filesystem(urls[0])
        try:
            fs.rm([u.partition("://")[2] for u in urls])
        except FileNotFoundError:
            pass
