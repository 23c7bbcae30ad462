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
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from .. import env
from ..errors import InvalidProblemError
from ..runtime import cpu as cpu_runtime
from .safetensors_io import PARTIAL_SUFFIX, remove_stale_partials, writing


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


def check_directory(directory: Path, force: bool) -> None:
    """Refuse to write into a non-empty directory that is not a checkpoint (--force
    allows it); dead partial files of an earlier run do not count."""
    if force or not directory.is_dir():
        return
    entries = [p for p in directory.iterdir() if not p.name.endswith(PARTIAL_SUFFIX)]
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
    a directory (checked by ``check_directory``); ``keep``: files never removed (IN)."""

    def __init__(self, base: Path, files: list[Path], index: Path | None,
                 directory_out: bool, force: bool, keep=()) -> None:
        self.directory = base.parent
        self._created = _missing_dirs(self.directory)
        with writing(self.directory):
            if self.directory.is_dir():
                remove_stale_partials(self.directory)
            if directory_out:
                check_directory(self.directory, force)
        new = {p.name for p in files} | ({index.name} if index is not None else set())
        self._stale = [p for p in self._previous(base) if p.name not in new
                       and not any(_same(p, k) for k in keep)]

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

    def finished(self) -> None:
        """Every new file is in place: remove the earlier conversion's leftovers."""
        for path in self._stale:
            path.unlink(missing_ok=True)

    def failed(self) -> None:
        """Remove the directories this conversion created (only if left empty)."""
        for d in reversed(self._created):
            try:
                d.rmdir()
            except OSError:
                break


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
