"""Runs commands, echoing each one first (secrets are passed on stdin, never in argv)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


class CommandFailed(Exception):
    def __init__(self, argv: Sequence[str], returncode: int):
        super().__init__(f"command failed ({returncode}): {shlex.join(argv)}")
        self.argv = list(argv)
        self.returncode = returncode


class Runner:
    def __init__(self, cwd: Path, *, echo=None):
        self.cwd = cwd
        self._echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))

    def run(self, argv: Sequence[str], *, capture: bool = False, stdin: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv``; with ``capture`` its stdout is returned (stripped) instead of shown."""
        self._echo(f"$ {shlex.join(argv)}")
        result = subprocess.run(list(argv), cwd=self.cwd, input=stdin, text=True,
                                stdout=subprocess.PIPE if capture else None)
        if check and result.returncode != 0:
            raise CommandFailed(argv, result.returncode)
        return result

    def output(self, argv: Sequence[str]) -> str:
        return (self.run(argv, capture=True).stdout or "").strip()
