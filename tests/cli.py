"""The project's tools run as a user runs them: a fresh Python process per run.

``run_cli("prune", "--drop", "0.04", cwd=folder)`` runs ``scripts/prune.py`` with this interpreter and returns
the finished process (stdout and stderr captured as text); ``start_cli`` starts one and returns at once (for
signals, kills and runs side by side); ``cli_argv`` is the command line itself (for a wrapper such as
``unshare``). ``run_python`` / ``start_python`` do the same for a ``python -c`` snippet.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Mapping, Optional

from tests.conftest import REPO

Env = Optional[Mapping[str, str]]


def cli_argv(tool: str, *args: object) -> list[str]:
    """The command line that runs ``scripts/<tool>.py`` with ``args`` (each turned into a string)."""
    return [sys.executable, str(REPO / "scripts" / f"{tool}.py"), *map(str, args)]


def run_cli(tool: str, *args: object, cwd: Optional[os.PathLike | str] = None, env: Env = None,
            timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``scripts/<tool>.py args...`` to the end; a run past ``timeout`` seconds fails the test (the default
    stays under the per-test timeout of pytest-timeout, so the run is named, not just the test)."""
    return subprocess.run(cli_argv(tool, *args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def start_cli(tool: str, *args: object, cwd: Optional[os.PathLike | str] = None, env: Env = None) -> subprocess.Popen:
    """Start ``scripts/<tool>.py args...`` with stdout and stderr as text pipes, and return at once."""
    return subprocess.Popen(cli_argv(tool, *args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def run_python(code: str, *args: object, cwd: Optional[os.PathLike | str] = REPO, env: Env = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -c code args...`` to the end (from the repository unless told), output captured as text."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_python(code: str, *args: object, cwd: Optional[os.PathLike | str] = REPO,
                 env: Env = None) -> subprocess.Popen:
    """Start ``python -c code args...`` with stdout as a text pipe (stderr left to the test's), and return at once."""
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            text=True)
