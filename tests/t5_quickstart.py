"""The README's two quick-start commands, as written, in a fresh clone (issue 6)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from support.mounts import force_unmount, wait_for
from support.runners import REPO


def quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [line.split("#", 1)[0].strip() for line in section.splitlines() if line.startswith("    make ")]


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (REPO / ".git").exists():
        pytest.fail("the quick-start test needs the project's git checkout")
    target = tmp_path_factory.mktemp("fresh") / "mirenfs"
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True, timeout=120)
    return target


def test_readme_names_the_two_commands() -> None:
    assert quick_start_commands() == ["make demo", "make test"]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def test_make_demo_in_a_fresh_clone(clone: Path) -> None:
    command = quick_start_commands()[0].split()
    log = clone / "demo.log"
    with open(log, "wb") as out:
        make = subprocess.Popen(
            command,
            cwd=clone,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    mountpoint: Path | None = None
    try:

        def mounted() -> str | None:
            if make.poll() is not None:
                raise AssertionError(f"make demo exited {make.returncode}: {log.read_text()[-3000:]}")
            match = re.search(r"mirenfs demo: mounted (\S+) ", log.read_text())
            return match.group(1) if match else None

        mountpoint = Path(wait_for(mounted, timeout=400, what="the demo mount", interval=0.2))
        snapshots = sorted(p.name for p in mountpoint.iterdir() if p.name.endswith(".mirn"))
        assert len(snapshots) == 2, snapshots
        assert (mountpoint / snapshots[0]).stat().st_size > 0
        demo = [pid for pid in _children(make.pid) if b"demo" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(demo) == 1, "expected make to run one `mirenfs demo`"
        os.kill(demo[0], signal.SIGINT)  # Ctrl-C, as the demo says
        assert make.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert not os.path.ismount(mountpoint)
        assert "stopped and removed" in log.read_text()
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait(timeout=30)
        if mountpoint is not None:
            force_unmount(mountpoint)  # a killed demo leaves its mount behind


def test_make_test_in_a_fresh_clone(clone: Path) -> None:
    command = quick_start_commands()[1].split()
    # As written; only the nested pytest is narrowed to a few tests, so the
    # suite does not run itself again (setup, ruff and mypy run in full).
    narrowed = "-k 'test_readme_names_the_two_commands or test_constants'"
    environment = {**os.environ, "PYTEST_ADDOPTS": narrowed}
    result = subprocess.run(command, cwd=clone, capture_output=True, text=True, timeout=900, env=environment)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\b2 passed\b", result.stdout), result.stdout[-2000:]
    assert "Success: no issues found" in result.stdout  # mypy ran
