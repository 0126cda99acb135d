"""Running mirenfs as users do: the console scripts in a subprocess, or the CLI in this process.

Every subprocess has a timeout, so a hung command fails its test instead of
hanging the suite. Nothing here mounts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mirenfs.cli import main

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
MIRENFS = VENV_BIN / "mirenfs"
HELPER = VENV_BIN / "mount.mirenfs"


def mirenfs_command() -> list[str]:
    """The installed console script when there is one, else the module."""
    return [str(MIRENFS)] if MIRENFS.exists() else [sys.executable, "-m", "mirenfs"]


DAEMON_HOOKS = Path(__file__).parent / "daemon_hooks"
HOLD_FROZEN_ENV = "MIRENFS_TEST_HOLD_FROZEN_S"


def hold_frozen_in_daemons(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """mirenfs processes started from now on stay ``seconds`` inside each freeze (a daemon
    that stalls there), through ``daemon_hooks/sitecustomize.py``; undo with
    :func:`stop_holding_frozen` once the process under test has started."""
    monkeypatch.setenv(HOLD_FROZEN_ENV, str(seconds))
    monkeypatch.setenv("PYTHONPATH", str(DAEMON_HOOKS), prepend=os.pathsep)


def stop_holding_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes started from now on do not stall (the hooks do nothing without the variable)."""
    monkeypatch.delenv(HOLD_FROZEN_ENV)


def run_mirenfs(
    *args: str, input: bytes | None = None, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI as users do; never hangs past ``timeout``."""
    return subprocess.run(
        [*mirenfs_command(), *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def run_cli(*args: str | Path) -> Result:
    """``mirenfs ARGS`` in this process, capturing stdout and stderr; argparse exits become codes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return Result(code, out.getvalue(), err.getvalue())


def run_cli_as_process_would(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    """:func:`run_cli`, answered as :func:`run_mirenfs` answers (exit status, output as bytes):
    for the tests of what a command says, where a process would add only its start (0.2 s)."""
    result = run_cli(*args)
    return subprocess.CompletedProcess(
        [str(arg) for arg in args], result.code, result.out.encode(), result.err.encode()
    )


def status_of(mountpoint: Path) -> dict[str, Any]:
    """``mirenfs status --json MOUNTPOINT``, run in this process (fast enough to poll); never stats
    a snapshot, so it starts no index pass."""
    result = run_cli("status", "--json", mountpoint)
    assert result.code == 0, result.err
    status: dict[str, Any] = json.loads(result.out)
    return status


def ok(*args: str | Path) -> Result:
    """``run_cli`` that must succeed."""
    result = run_cli(*args)
    assert result.code == 0, f"mirenfs {' '.join(map(str, args))} failed: {result.err}"
    return result


def refused(expected_code_text: str, *args: str | Path) -> str:
    """``run_cli`` that must be refused with exit status 1 and one line holding ``expected_code_text``."""
    result = run_cli(*args)
    assert result.code == 1, f"expected a refusal, got {result.code}: {result.out}{result.err}"
    assert result.err.startswith("mirenfs: error: ") and result.err.count("\n") == 1, result.err
    assert expected_code_text in result.err, result.err
    return result.err


def refused_restore(expected_code_text: str, snapshot: str | Path, name: str, data: str | Path) -> str:
    """``mirenfs restore SNAPSHOT --name NAME --force`` into data path ``data``, refused (see
    :func:`refused`)."""
    return refused(expected_code_text, "restore", snapshot, "--name", name, "--force", "--data-path", data)


TIMEOUT = 60  # seconds, for any one command run by :func:`run`


def run(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Any command (``mount``, ``systemd-analyze``, mirenfs itself), text output captured."""
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False
    )
