"""Content-addressed, crash-safe disk cache of built kernels.

Layout: ``<root>/<dqgen version>/<target>/<key[:2]>/<key>/`` holding the source, the
binary and ``meta.json``. ``meta.json`` is written last and records the sha256 of every
file in the entry, so it is the commit marker: an entry without it, or whose files do
not match it, is never trusted and is rebuilt with a warning. Files are written to a
private temp dir and moved in with ``os.replace`` (a new inode: a binary some process has
mapped is never rewritten in place); builders of one key serialise on a per-key file
lock and re-check inside it, so concurrent processes build once and never see half a
file. Whatever a killed builder left behind is removed by the next one, under the lock.

The root is private: created 0700 (every directory below it too), and refused when
another user owns it or others can write to it, since its code gets loaded. A cache that
cannot be written is still read; kernels missing from it are built into a private
temporary directory for this process, which is said once.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

import filelock
import platformdirs

from . import env
from .errors import CacheError
from .version import __version__

CACHE_FORMAT = 1
META = "meta.json"
LOCK_TIMEOUT_S = 600.0  # default of DQGEN_LOCK_TIMEOUT
# errnos meaning "this directory cannot be written": fall back to a private temp dir.
_UNWRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})

_root_lock = threading.Lock()
_root: Path | None = None
_root_env: str | None = None
# Where builds go when the root cannot be written: (root it stands in for, pid, dir).
_fallback: tuple[Path, int, Path] | None = None
_memo_values: dict[tuple[str, str], str] = {}


def _reset_after_fork() -> None:
    # A lock held by another thread at fork time would never be released in the child.
    global _root_lock
    _root_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def lock_timeout() -> float:
    """Seconds to wait for another process's build: ``DQGEN_LOCK_TIMEOUT``."""
    return env.seconds(env.LOCK_TIMEOUT, LOCK_TIMEOUT_S)


def _check_private(path: Path) -> None:
    """Refuse a directory others could write into: its code would be loaded by us."""
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"cache dir {path} is not a directory; set DQGEN_CACHE_DIR to a directory")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise CacheError(f"cache dir {path} is owned by uid {st.st_uid}, not by this user "
                         f"(uid {os.getuid()}); set DQGEN_CACHE_DIR to a directory you own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheError(f"cache dir {path} is writable by group or others (mode "
                         f"{stat.S_IMODE(st.st_mode):o}); chmod 700 it or set DQGEN_CACHE_DIR")


def _make_private_dir(path: Path) -> Path:
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    _check_private(path)
    return path


def _warn(message: str) -> None:
    warnings.warn(f"dqgen: {message}", RuntimeWarning, stacklevel=4)


def _fallback_root(stands_for: Path | None, reason: str) -> Path:
    """This process's private temporary cache, created (and announced) once."""
    global _fallback
    if _fallback is not None and _fallback[1] == os.getpid() and _fallback[2].is_dir():
        if stands_for is None or _fallback[0] == stands_for:
            return _fallback[2]
    path = Path(tempfile.mkdtemp(prefix="dqgen-cache-"))  # 0700, a fresh unguessable name
    _fallback = (stands_for or path, os.getpid(), path)
    creator = os.getpid()
    atexit.register(lambda: os.getpid() == creator and shutil.rmtree(path, ignore_errors=True))
    _warn(f"{reason}; kernels this process builds go to the private temporary dir {path} "
          "and are removed at exit")
    return path


def cache_root() -> Path:
    """The cache directory: ``DQGEN_CACHE_DIR`` if set, else the user cache dir.

    An explicitly named directory that is unsafe (foreign owner, writable by others, not
    a directory) is an error. The default location, if unsafe, is replaced by a private
    temporary directory with a warning. A root that cannot be created is replaced the
    same way; one that exists but cannot be written is still read (see ``ensure``).
    """
    global _root, _root_env
    named = os.environ.get(env.CACHE_DIR) or None
    with _root_lock:
        if _root is not None and named == _root_env:
            return _root
        if named:
            path = Path(named).expanduser().resolve()
            try:
                root = _make_private_dir(path)
            except OSError as exc:
                if exc.errno not in _UNWRITABLE:
                    raise CacheError(f"DQGEN_CACHE_DIR={path} cannot be used: {exc}") from exc
                root = _fallback_root(
                    None, f"DQGEN_CACHE_DIR={path} cannot be created ({exc.strerror})")
        else:
            path = Path(platformdirs.user_cache_dir("dqgen", appauthor=False))
            try:
                root = _make_private_dir(path)
            except (CacheError, OSError) as exc:
                root = _fallback_root(None, f"the default cache dir is unusable: {exc}")
        _root, _root_env = root, named
        return root


def version_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / __version__


def entry_dir(target: str, key: str, root: Path | None = None) -> Path:
    return version_dir(root) / target / key[:2] / key


def private_subdir(name: str) -> Path:
    """``<cache>/<version>/<name>``, created 0700 all the way down (for side caches)."""
    root = cache_root()
    path = version_dir(root) / name
    _makedirs(path, root)
    return path


def _makedirs(path: Path, root: Path) -> None:
    """Create ``path`` and any missing directory between it and ``root``, each 0700.

    ``root`` itself is never created here: it must exist and still be private.
    """
    _check_private(root)
    missing = []
    current = path
    while current != root and not current.is_dir():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue
        os.chmod(directory, 0o700)  # whatever the umask says


def _read_meta(entry: Path) -> dict | None:
    try:
        meta = json.loads((entry / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _plain_name(name: object) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..")
            and "/" not in name and "\0" not in name)


def _problem(entry: Path, meta: dict, required: tuple[str, ...]) -> str | None:
    """Why the entry described by ``meta`` cannot be trusted, or None if it can."""
    files = meta.get("files")
    if meta.get("cache_format") != CACHE_FORMAT or not isinstance(files, dict) or not files:
        return f"{META} is not a format-{CACHE_FORMAT} commit record"
    if not all(_plain_name(n) and isinstance(d, str) for n, d in files.items()):
        return f"{META} lists malformed file names or hashes"
    for name in required:
        if name not in files:
            return f"{META} does not record {name}"
    for name, digest in files.items():
        path = entry / name
        if not path.is_file() or sha256_file(path) != digest:
            return f"{name} does not match its recorded hash (truncated or altered)"
    with contextlib.suppress(OSError):
        for path in entry.iterdir():
            if path.name != META and not path.name.startswith(".") and path.name not in files:
                return f"{path.name} is not recorded in {META}"
    return None


def check_entry(entry: Path, required: tuple[str, ...] = (), *,
                 quiet: bool = False) -> dict | None:
    """The entry's metadata if every file in it is recorded and matches its hash.

    Returns None for an absent entry; warns (unless ``quiet``) when an entry exists but
    is damaged, since it is then rebuilt.
    """
    meta = _read_meta(entry)
    if meta is None:
        if (entry / META).exists() and not quiet:
            _warn(f"cache entry {entry} has an unreadable {META}; rebuilding it")
        return None
    problem = _problem(entry, meta, required)
    if problem is not None:
        if not quiet:
            _warn(f"cache entry {entry}: {problem}; rebuilding it")
        return None
    return meta


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_root(root: Path) -> Path:
    """Where this process builds: the root, or its stand-in once it proved unwritable."""
    if _fallback is not None and _fallback[0] == root and _fallback[1] == os.getpid():
        return _fallback[2]
    return root


def ensure(target: str, key: str, produce: Callable[[Path], dict],
           required: tuple[str, ...] = ()) -> tuple[Path, dict, bool]:
    """Return ``(entry_dir, meta, built)`` for ``key``, building it at most once.

    ``produce(tmpdir)`` writes the entry's files into ``tmpdir`` and returns extra
    metadata; the cache records the hashes and commits the entry. ``required`` names
    files a trusted entry must hold.
    """
    root = cache_root()
    entry = entry_dir(target, key, root)
    meta = check_entry(entry, required)
    if meta is not None:
        return entry, meta, False
    write_root = _write_root(root)
    if write_root == root:
        try:
            return _ensure_in(root, target, key, produce, required)
        except OSError as exc:
            if exc.errno not in _UNWRITABLE:
                raise CacheError(f"cannot write the cache entry {entry}: {exc}") from exc
            write_root = _fallback_root(
                root, f"the cache dir {root} is not writable ({exc.strerror})")
    fallback_entry = entry_dir(target, key, write_root)
    meta = check_entry(fallback_entry, required)
    if meta is not None:
        return fallback_entry, meta, False
    return _ensure_in(write_root, target, key, produce, required)


def _ensure_in(root: Path, target: str, key: str, produce: Callable[[Path], dict],
               required: tuple[str, ...]) -> tuple[Path, dict, bool]:
    """Build ``key`` under ``root`` unless another process does so first."""
    entry = entry_dir(target, key, root)
    _makedirs(entry.parent, root)
    timeout = lock_timeout()
    lock = filelock.FileLock(str(entry.parent / f"{key}.lock"), timeout=timeout)
    try:
        with lock:
            meta = check_entry(entry, required, quiet=True)  # built by another process meanwhile?
            if meta is not None:
                return entry, meta, False
            _remove_leftovers(entry, key)
            return entry, _build_entry(root, entry, key, produce), True
    except filelock.Timeout as exc:
        raise CacheError(f"timed out after {timeout:g} s waiting for the lock on "
                         f"{entry} (DQGEN_LOCK_TIMEOUT sets the limit)") from exc


def _remove_leftovers(entry: Path, key: str) -> None:
    """Delete what killed builders of ``key`` left: we hold its lock, so they are gone."""
    for stale in entry.parent.glob(f".{key}-build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if entry.is_dir():
        for stale in entry.glob(f".{META}.*"):
            with contextlib.suppress(OSError):
                stale.unlink()


def _build_entry(root: Path, entry: Path, key: str, produce: Callable[[Path], dict]) -> dict:
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}-build-"))
    try:
        extra = produce(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())
                 if p.is_file() and p.name != META}
        if not files:
            raise CacheError(f"building {entry.name} produced no files")
        _makedirs(entry, root)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry / META)  # decommit a damaged entry before touching its files
        for old in entry.iterdir():
            if old.name not in files and not old.is_dir():
                old.unlink()  # an unrecorded file would leave the entry untrusted
        for name in files:
            os.replace(tmp / name, entry / name)  # new inode: a mapped old .so stays intact
        meta = {"cache_format": CACHE_FORMAT, "dqgen_version": __version__, **extra,
                "files": files}
        _atomic_write(entry / META, json.dumps(meta, indent=2, sort_keys=True).encode())
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def memo_json(name: str, key: str, compute: Callable[[], str]) -> str:
    """A small persisted memo (e.g. a compiler's version text) keyed by ``key``.

    Computed once per key however many processes ask at once (a file lock and a re-check,
    like ``ensure``); an unwritable cache only loses the persistence.
    """
    if (name, key) in _memo_values:
        return _memo_values[(name, key)]
    root = cache_root()
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    path = version_dir(root) / "probes" / f"{name}-{digest}.json"
    value = _read_memo(path, key)
    if value is None:
        try:
            _makedirs(path.parent, root)
            with filelock.FileLock(str(path) + ".lock", timeout=lock_timeout()):
                value = _read_memo(path, key)
                if value is None:
                    value = compute()
                    _atomic_write(path, json.dumps({"key": key, "value": value}).encode())
        except (OSError, filelock.Timeout) as exc:
            if isinstance(exc, OSError) and exc.errno not in _UNWRITABLE:
                raise CacheError(f"cannot write {path}: {exc}") from exc
            value = compute() if value is None else value
    _memo_values[(name, key)] = value
    return value


def _read_memo(path: Path, key: str) -> str | None:
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("key") == key and isinstance(data.get("value"), str):
            return data["value"]
    except (OSError, ValueError):
        pass
    return None


def root_path() -> Path:
    """Where the cache root is (or would be), found without creating or checking it."""
    named = os.environ.get(env.CACHE_DIR) or None
    with _root_lock:
        if _root is not None and named == _root_env:
            return _root
    if named:
        return Path(named).expanduser().resolve()
    return Path(platformdirs.user_cache_dir("dqgen", appauthor=False))


def info() -> dict:
    """Directory, entry count and total size of the cache (for ``dqgen cache info``),
    read only: a cache that does not exist yet is reported as empty, not created."""
    root = root_path()
    if not root.is_dir():
        return {"dir": str(root), "exists": False, "entries": 0, "bytes": 0}
    entries = list(root.glob(f"*/*/??/*/{META}"))
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {"dir": str(root), "exists": True, "entries": len(entries), "bytes": size}


def clear() -> int:
    """Remove every entry of every version; return how many entries were removed."""
    root = cache_root()
    count = len(list(root.glob(f"*/*/??/*/{META}")))
    for child in root.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()
    return count
