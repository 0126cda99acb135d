"""Helpers for the disk store tests: running the CLI in-process, recording everything
a refusal must leave unchanged, loop devices that are always detached, and the
worker of the two-process store test (importable by a spawned process)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirenfs.cli import main

VECTORS = Path(__file__).parent / "vectors"
GO_EXT4 = VECTORS / "go-ext4.mirn"
GO_EXT4_SHA = "f7fd4f76f15bb25b86bdda3f0e95569bfc2ee7776c12cd046b6d641eca34bdf6"
GO_EXT4_SIZE = 16777216
GO_ODD = VECTORS / "go-odd.mirn"
GO_ODD_SHA = "e74c5dbb36aa7650aac738ad78e49637c0f1baf13afb6465014b06d35bdfd6b5"
GO_ODD_SIZE = 1000003

BAD_NAMES = ["../x", "a/b", ".hidden", "", "x" * 64, "sp ace"]


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


def ok(*args: str | Path) -> Result:
    result = run_cli(*args)
    assert result.code == 0, f"mirenfs {' '.join(map(str, args))} failed: {result.err}"
    return result


def disks(data_path: Path) -> dict[str, dict[str, Any]]:
    """``disk list --json`` by disk name."""
    listed = json.loads(ok("disk", "list", "--json", "--data-path", data_path).out)
    return {entry["name"]: entry for entry in listed}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def store_state(data_path: Path) -> dict[str, Any]:
    """Everything a refusal must not change: the store's rows, every file's bytes, every directory."""
    rows: dict[str, list[tuple[Any, ...]]] = {}
    database = data_path / "mirenfs.db"
    if database.exists():
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        try:
            for table in ("disks", "volumes", "leases"):
                rows[table] = sorted(db.execute(f"SELECT * FROM {table}").fetchall())
        except sqlite3.DatabaseError:  # not a database (a test broke it on purpose): its bytes, then
            rows = {"raw": [(file_sha256(database),)]}
        finally:
            db.close()
    files = {
        str(path.relative_to(data_path)): file_sha256(path)
        for path in sorted(data_path.rglob("*"))
        if path.is_file() and not path.name.startswith("mirenfs.db")
    }
    directories = sorted(str(path.relative_to(data_path)) for path in data_path.rglob("*") if path.is_dir())
    return {"rows": rows, "files": files, "directories": directories}


def staging_files(data_path: Path) -> list[Path]:
    return sorted(data_path.rglob("*.restore.tmp"))


STATUS_CYCLE = ("detached", "attached", "error", "provisioned")


def churn_store(data_path: str, disk: str, rounds: int, barrier: Any, results: Any) -> None:
    """One of the processes of the concurrency test: changes its own disk and reads the whole store.

    Reports (disk, problems, last status set, leases acquired) through ``results``.
    """
    problems: list[str] = []
    acquired = 0
    status = ""
    barrier.wait(timeout=120)
    for round_number in range(rounds):
        status = STATUS_CYCLE[round_number % len(STATUS_CYCLE)]
        changed = run_cli("disk", "set-status", disk, status, "--data-path", data_path)
        if changed.code != 0:
            problems.append(f"set-status: {changed.err}")
        listed = run_cli("disk", "list", "--json", "--data-path", data_path)
        if listed.code != 0:
            problems.append(f"list: {listed.err}")
        else:
            by_name = {entry["name"]: entry for entry in json.loads(listed.out)}
            mine = by_name.get(disk)
            if mine is None or mine["status"] != status:
                problems.append(f"list shows {mine and mine['status']} for {disk}, just set to {status}")
            if any(entry["status"] not in (*STATUS_CYCLE, "provisioned") for entry in by_name.values()):
                problems.append(f"list shows an unexpected status: {listed.out}")
        if round_number % 5 == 0:
            lease = run_cli("lease", "acquire", disk, "--data-path", data_path)
            if lease.code != 0:
                problems.append(f"lease acquire: {lease.err}")
                continue
            acquired += 1
            released = run_cli("lease", "release", lease.out.strip(), "--data-path", data_path)
            if released.code != 0:
                problems.append(f"lease release: {released.err}")
    results.put((disk, problems, status, acquired))
