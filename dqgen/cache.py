"""Content-addressed, crash-safe disk cache of built kernels.

Layout: ``<root>/<dqgen version>/<target>/<key[:2]>/<key>/`` holding the source, the
binary and ``meta.json``. ``meta.json`` is written last and records the sha256 of every
file, so it is the commit marker: an entry without it, or whose files do not match it,
is never trusted. Files are written to a private temp dir and moved in with
``os.replace``; builders of one key serialise on a per-key file lock and re-check
inside it, so concurrent processes build once and never see half a file.
"""

from __future__ import annotations

import contextlib
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

from . import __version__
from .errors import CacheError

CACHE_FORMAT = 1
META = "meta.json"
LOCK_TIMEOUT_S = float(os.environ.get("DQGEN_LOCK_TIMEOUT", "600"))
_root_lock = threading.Lock()
_root: Path | None = None
_root_env: str | None = None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_private(path: Path) -> None:
    """Refuse a directory others could write into: its code would be loaded by us."""
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise CacheError(f"cache dir {path} is owned by uid {st.st_uid}, not by this user "
                         f"(uid {os.getuid()}); set DQGEN_CACHE_DIR to a directory you own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheError(f"cache dir {path} is writable by group or others (mode "
                         f"{stat.S_IMODE(st.st_mode):o}); chmod 700 it or set DQGEN_CACHE_DIR")


def _make_private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(path)
    return path


def _fallback_root(reason: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="dqgen-cache-"))
    warnings.warn(f"dqgen: {reason}; using the private temporary cache {path} for this process",
                  RuntimeWarning, stacklevel=3)
    return path


def cache_root() -> Path:
    """The cache directory: ``DQGEN_CACHE_DIR`` if set, else the user cache dir.

    An explicitly named directory that is unsafe is an error. The default location, if
    unsafe or unwritable, is replaced by a private temporary directory with a warning.
    """
    global _root, _root_env
    env = os.environ.get("DQGEN_CACHE_DIR") or None
    with _root_lock:
        if _root is not None and env == _root_env:
            return _root
        if env:
            path = Path(env).expanduser().resolve()
            try:
                root = _make_private_dir(path)
            except PermissionError:
                root = _fallback_root(f"DQGEN_CACHE_DIR={path} is not writable")
            if not os.access(root, os.W_OK):
                root = _fallback_root(f"DQGEN_CACHE_DIR={path} is not writable")
        else:
            path = Path(platformdirs.user_cache_dir("dqgen", appauthor=False))
            try:
                root = _make_private_dir(path)
                if not os.access(root, os.W_OK):
                    root = _fallback_root(f"the cache dir {path} is not writable")
            except (CacheError, OSError) as exc:
                root = _fallback_root(str(exc))
        _root, _root_env = root, env
        return root


def version_dir() -> Path:
    return cache_root() / __version__


def entry_dir(target: str, key: str) -> Path:
    return version_dir() / target / key[:2] / key


def _read_meta(entry: Path) -> dict | None:
    try:
        return json.loads((entry / META).read_text())
    except (OSError, ValueError):
        return None


def verify_entry(entry: Path) -> dict | None:
    """The entry's metadata if every file it lists is present and matches its hash.

    Returns None for an absent entry; warns when an entry exists but is damaged.
    """
    meta = _read_meta(entry)
    if meta is None:
        if (entry / META).exists():
            warnings.warn(f"dqgen: cache entry {entry} has an unreadable {META}; rebuilding",
                          RuntimeWarning, stacklevel=3)
        return None
    for name, digest in meta.get("files", {}).items():
        path = entry / name
        if not path.is_file() or sha256_file(path) != digest:
            warnings.warn(f"dqgen: cache entry {entry}: {name} does not match its recorded "
                          "hash (truncated or altered); rebuilding it", RuntimeWarning, stacklevel=3)
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


def ensure(target: str, key: str, produce: Callable[[Path], dict]) -> tuple[Path, dict, bool]:
    """Return ``(entry_dir, meta, built)`` for ``key``, building it at most once.

    ``produce(tmpdir)`` writes the entry's files into ``tmpdir`` and returns extra
    metadata; the cache records the hashes and commits the entry.
    """
    entry = entry_dir(target, key)
    meta = verify_entry(entry)
    if meta is not None:
        return entry, meta, False
    entry.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = filelock.FileLock(str(entry.parent / f"{key}.lock"), timeout=LOCK_TIMEOUT_S)
    try:
        with lock:
            meta = verify_entry(entry)  # another process may have built it meanwhile
            if meta is not None:
                return entry, meta, False
            return entry, _build_entry(entry, produce), True
    except filelock.Timeout as exc:
        raise CacheError(f"timed out after {LOCK_TIMEOUT_S:.0f} s waiting for the lock on "
                         f"{entry} (DQGEN_LOCK_TIMEOUT sets the limit)") from exc


def _build_entry(entry: Path, produce: Callable[[Path], dict]) -> dict:
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name[:16]}-build-"))
    try:
        extra = produce(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        entry.mkdir(mode=0o700, exist_ok=True)
        with contextlib.suppress(OSError):
            os.unlink(entry / META)  # decommit a damaged entry before touching its files
        for name in files:
            os.replace(tmp / name, entry / name)  # new inode: a mapped old .so stays intact
        meta = {"cache_format": CACHE_FORMAT, "dqgen_version": __version__, **extra,
                "files": files}
        _atomic_write(entry / META, json.dumps(meta, indent=2, sort_keys=True).encode())
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def memo_json(name: str, key: str, compute: Callable[[], str]) -> str:
    """A small persisted memo (e.g. a compiler's version text) keyed by ``key``."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    path = version_dir() / "probes" / f"{name}-{digest}.json"
    try:
        data = json.loads(path.read_text())
        if data.get("key") == key:
            return data["value"]
    except (OSError, ValueError, KeyError):
        pass
    value = compute()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _atomic_write(path, json.dumps({"key": key, "value": value}).encode())
    return value


def info() -> dict:
    """Directory, entry count and total size of the cache (for ``dqgen cache info``)."""
    root = cache_root()
    entries = list(root.glob(f"*/*/??/*/{META}"))
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {"dir": str(root), "entries": len(entries), "bytes": size}


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
