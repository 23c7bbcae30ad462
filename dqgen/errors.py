"""The exceptions dqgen raises.

Every error a caller can cause is a ``DqgenError``; the subclasses also derive from the
built-in exception a Python user would try to catch (``ValueError`` for a bad problem,
``TypeError`` for an unsupported dtype or device, ``RuntimeError`` for a failed build).
"""

from __future__ import annotations


class DqgenError(Exception):
    """Base class of every error dqgen raises on purpose."""


class InvalidProblemError(DqgenError, ValueError):
    """The problem is ill-formed: a size, shape, buffer, range or alias is wrong."""


class UnsupportedError(DqgenError, TypeError):
    """The request is well-formed but names a dtype, op, layout or device dqgen lacks."""


class MissingKernelError(DqgenError, LookupError):
    """JIT is disabled and no bundle holds the kernel that was asked for."""


class CacheError(DqgenError, RuntimeError):
    """The kernel cache cannot be used safely (wrong owner, unsafe permissions, damage)."""


class CompileError(DqgenError, RuntimeError):
    """A kernel failed to build; carries the command, the compiler log and the source."""

    def __init__(self, message: str, *, command: list[str] | str | None = None,
                 log: str = "", source: str = "") -> None:
        self.command = command
        self.log = log
        self.source = source
        super().__init__(message)

    def numbered_source(self) -> str:
        """The source with 1-based line numbers, as a compiler diagnostic refers to it."""
        lines = self.source.splitlines()
        width = len(str(len(lines))) if lines else 1
        return "\n".join(f"{i:>{width}} | {line}" for i, line in enumerate(lines, 1))

    def dump(self) -> str:
        """Everything needed to reproduce the failure, as one printable text."""
        cmd = self.command if isinstance(self.command, str) else " ".join(self.command or [])
        return (f"{self.args[0]}\n--- command ---\n{cmd}\n--- log ---\n{self.log}\n"
                f"--- source ---\n{self.numbered_source()}\n")

    def __str__(self) -> str:
        tail = self.log.strip().splitlines()[-20:]
        return self.args[0] + ("\n" + "\n".join(tail) if tail else "")


class CudaDriverError(DqgenError, RuntimeError):
    """A CUDA driver call failed (bad launch, out of memory, illegal address ...)."""
