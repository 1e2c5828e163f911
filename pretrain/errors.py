"""Exceptions raised at the boundary with the user; the CLI turns them into messages and exit codes."""

from __future__ import annotations


class PretrainError(Exception):
    """A problem the user can fix (bad input, missing file); shown without a traceback, exit 1."""

    exit_code = 1


class ConfigError(PretrainError):
    """One or more problems in the configuration, all reported at once; exit 2."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"invalid configuration{where} ({len(self.problems)} problem(s)):"]
        lines += [f"  - {problem}" for problem in self.problems]
        super().__init__("\n".join(lines))


class CorruptCheckpoint(PretrainError):
    """A checkpoint that is truncated or damaged: resuming falls back to the previous one."""


# `pretrain train` exits with this after saving a checkpoint on SIGTERM/SIGUSR1 (EX_TEMPFAIL:
# "try again later"), so a launcher can tell a preempted run from a failed one and requeue it.
PREEMPTED_EXIT_CODE = 75
