"""What ``dqgen convert`` may write over and what it leaves behind.

A conversion writes its files beside each other (``safetensors_io.Partial`` temporary
files, moved into place at the end). Around that, ``Destination``:

- refuses a directory OUT that holds files but no safetensors checkpoint (an earlier
  conversion's output), unless ``--force``: the new shards would be mixed in silently;
- removes the partial files a killed run left there (never a live one: see ``Partial``);
- once every new file is in place, removes what an earlier conversion to the same place
  wrote and this one did not (its index, the shards the index listed, ``NAME-0000k-of-
  0000n`` shards of the same name): otherwise a loader could pick up the old ones;
- on failure or Ctrl-C, removes the directories it created, so nothing is left that
  was not there before.

A conversion split with ``--shards I/N`` (slices run at the same time, on other
machines, into one OUT on a shared filesystem) writes only its slice's shards; each
slice then records itself done in the slice ledger (``SliceLedger``, a hidden file in OUT,
held under a POSIX lock while read and written, which NFS honours too), and the slice
that finds every slice done writes the index and side files, removes the earlier
conversion's leftovers and the ledger. The index appears only once every shard it
names is in place; no slice removes another's files or refuses a directory because
another slice wrote there first (nor does it remove the directories it made).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path

from .. import env
from ..errors import InvalidProblemError
from ..runtime import cpu as cpu_runtime
from .safetensors_io import PARTIAL_SUFFIX, new_file_mode, remove_stale_partials, writing

try:
    import fcntl
except ImportError:  # no POSIX locks: --shards is refused
    fcntl = None

SLICES_SUFFIX = ".dqgen-slices"


def index_path(base: Path) -> Path:
    """The index that goes with shards of ``base``: ``NAME.index.json`` beside it."""
    return base.with_name(base.name + ".index.json")


def shard_pattern(base: Path) -> re.Pattern:
    """Names of shards of ``base`` as ``shard_paths`` writes them, any count."""
    stem, suffix = (base.stem, base.suffix) if base.suffix else (base.name, ".safetensors")
    return re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}" + re.escape(suffix))


def looks_like_checkpoint(directory: Path) -> bool:
    """The directory holds a safetensors file or index (what a conversion writes)."""
    return any(not p.name.startswith(".") and p.name.endswith((".safetensors", ".index.json"))
               for p in directory.iterdir())


def ledger_path(base: Path) -> Path:
    """The slice ledger of a conversion split with ``--shards`` whose shards are named
    after ``base``: a hidden file beside them."""
    return base.with_name(f".{base.name}{SLICES_SUFFIX}")


def check_directory(directory: Path, force: bool) -> None:
    """Refuse to write into a non-empty directory that is not a checkpoint (--force
    allows it); partial files and a slice ledger (another slice's) do not count."""
    if force or not directory.is_dir():
        return
    entries = [p for p in directory.iterdir()
               if not p.name.endswith((PARTIAL_SUFFIX, SLICES_SUFFIX))]
    if entries and not looks_like_checkpoint(directory):
        shown = ", ".join(sorted(p.name for p in entries)[:3]) + (", ..." if len(entries) > 3
                                                                   else "")
        raise InvalidProblemError(
            f"OUT {directory} is not empty ({shown}) and holds no safetensors checkpoint; "
            "refusing to write the converted files among them (pass --force to do it anyway, "
            "or name an empty or new directory)")


def _missing_dirs(directory: Path) -> list[Path]:
    """``directory`` and its ancestors that do not exist yet, outermost first."""
    missing = []
    for d in [directory, *directory.parents]:
        if d.exists() or d.is_symlink():
            break
        missing.append(d)
    return missing[::-1]


def _listed_files(index: Path) -> set[str]:
    """The plain file names an existing index's weight_map names (none when unreadable)."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names = set(weight_map.values())
    except (OSError, ValueError, AttributeError, TypeError):
        return set()
    return {n for n in names if isinstance(n, str) and n and "/" not in n and os.sep not in n
            and not n.startswith(".")}


class Destination:
    """The files one conversion writes (``files`` and ``index``, all in one directory,
    named after ``base``), and what it leaves around them. ``directory_out``: OUT names
    a directory (checked by ``check_directory``); ``keep``: files never removed (IN);
    ``sliced``: one slice of a conversion split with ``--shards`` (``files`` are every
    slice's), which never removes the directories it made: another slice writes there."""

    def __init__(self, base: Path, files: list[Path], index: Path | None,
                 directory_out: bool, force: bool, keep=(), sliced: bool = False) -> None:
        self.directory = base.parent
        self._base, self._keep = base, tuple(keep)
        self._created = [] if sliced else _missing_dirs(self.directory)
        with writing(self.directory):
            if self.directory.is_dir():
                remove_stale_partials(self.directory)
            if directory_out:
                check_directory(self.directory, force)
        self._new = {p.name for p in files} | ({index.name} if index is not None else set())
        self._stale = self.leftovers()

    def leftovers(self) -> list[Path]:
        """What an earlier conversion to the same place wrote and this one does not (read
        before this one's index replaces the earlier index, which names them)."""
        return [p for p in self._previous(self._base) if p.name not in self._new
                and not any(_same(p, k) for k in self._keep)]

    def _previous(self, base: Path) -> list[Path]:
        """The files an earlier conversion named like this one left in the directory."""
        if not self.directory.is_dir():
            return []
        index = index_path(base).name
        pattern = shard_pattern(base)
        names = {base.name, index} | _listed_files(index_path(base))
        names |= {n for n in os.listdir(self.directory) if pattern.fullmatch(n)}
        return [self.directory / n for n in sorted(names)
                if (n == index or n.endswith(".safetensors"))
                and (self.directory / n).is_file() and not (self.directory / n).is_symlink()]

    def prepare(self) -> None:
        """Create the directory the files go to."""
        with writing(self.directory):
            self.directory.mkdir(parents=True, exist_ok=True)

    def finished(self, stale: list[Path] | None = None) -> None:
        """Every new file is in place: remove the earlier conversion's leftovers (those
        found when it began, or ``stale``) and any slice ledger left by a split one."""
        for path in self._stale if stale is None else stale:
            path.unlink(missing_ok=True)
        ledger_path(self._base).unlink(missing_ok=True)

    def failed(self) -> None:
        """Remove the directories this conversion created (only if left empty)."""
        for d in reversed(self._created):
            try:
                d.rmdir()
            except OSError:
                break


class SliceLedger:
    """Which slices of a conversion split with ``--shards`` are done: ``{"conversion":
    key, "done": [slices]}`` in ``ledger_path(base)``, read and written in place under a
    POSIX lock (taking it makes an NFS client read the file afresh). A ledger of another
    conversion (another key: other input, settings or slice count) or an unreadable one
    is started over."""

    def __init__(self, base: Path) -> None:
        self.path = ledger_path(base)

    @contextlib.contextmanager
    def record(self, key: str, index: int):
        """Record slice ``index`` done; yields the slices done (sorted), the lock held
        until the block ends, so the one that finds them all finishes alone."""
        if fcntl is None:
            raise InvalidProblemError("--shards needs POSIX file locks, which this system "
                                      "does not have")
        with writing(self.path):
            fd = self._open_locked()
        try:
            with writing(self.path):
                done = self._read(fd, key)
                done = sorted(set(done) | {index})
                data = json.dumps({"conversion": key, "done": done}).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            yield done
        finally:
            os.close(fd)  # releases the lock

    def remove(self) -> None:
        """The conversion is finished (called with the lock held)."""
        self.path.unlink(missing_ok=True)

    def _open_locked(self) -> int:
        """The ledger, open and locked; opened again if it was removed meanwhile (a
        finishing slice removes it: a lock on the removed file would guard nothing)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, new_file_mode())
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _read(self, fd: int, key: str) -> list[int]:
        """The slices of conversion ``key`` recorded done (none for another's ledger)."""
        chunks = []
        while chunk := os.pread(fd, 1 << 16, sum(map(len, chunks))):
            chunks.append(chunk)
        try:
            value = json.loads(b"".join(chunks) or b"{}")
            done = value.get("done", []) if value.get("conversion") == key else []
        except (ValueError, AttributeError):
            done = []
        return [d for d in done if type(d) is int]


def _same(a: Path, b) -> bool:
    try:
        return a.resolve() == Path(b).resolve()
    except OSError:
        return False


def kernel_jobs(jobs: int | None) -> int | None:
    """Kernel threads for the command: ``-j``, else ``DQGEN_NUM_THREADS`` (None when
    neither is set), checked and lowered to what the machine can use, saying so."""
    if jobs is not None:
        if jobs < 1:
            raise InvalidProblemError(f"-j/--jobs={jobs} must be >= 1")
        given = f"-j {jobs}"
    else:
        jobs = env.integer(env.NUM_THREADS, None, minimum=1)
        if jobs is None:
            return None
        given = f"{env.NUM_THREADS}={jobs}"
    limit = cpu_runtime.thread_limit()
    if jobs > limit:
        print(f"dqgen convert: {given} is more threads than this machine can use "
              f"({cpu_runtime.usable_cpus()} CPUs); running {limit}", file=sys.stderr)
        return limit
    return jobs
