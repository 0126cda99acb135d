"""The disk store as tests see it: disks made and listed through the public CLI and library,
everything a refusal must leave unchanged, and the worker of the two-process store test.

``churn_store`` is imported by a spawned process: this module must stay
importable on its own (no fixtures, no test modules).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from mirenfs.disks.manage import create_disk
from mirenfs.disks.store import Store

from support.data import sha256_file
from support.runners import ok, run_cli


def make_disk(data: Path, name: str, size: int = 16 << 20, filesystem: str = "ext4") -> str:
    """A disk of the store at ``data`` with a formatted image; returns the image path."""
    return create_disk(Store(str(data)), name, size_bytes=size, filesystem=filesystem).image_path


def disks(data_path: Path) -> dict[str, dict[str, Any]]:
    """``disk list --json`` by disk name."""
    listed = json.loads(ok("disk", "list", "--json", "--data-path", data_path).out)
    return {entry["name"]: entry for entry in listed}


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
            rows = {"raw": [(sha256_file(database),)]}
        finally:
            db.close()
    files = {
        str(path.relative_to(data_path)): sha256_file(path)
        for path in sorted(data_path.rglob("*"))
        if path.is_file() and not path.name.startswith("mirenfs.db")
    }
    directories = sorted(str(path.relative_to(data_path)) for path in data_path.rglob("*") if path.is_dir())
    return {"rows": rows, "files": files, "directories": directories}


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
