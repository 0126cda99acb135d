"""Every bad snapshot of issue 2 is refused, and the existing image is left exactly as it was."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from mirenfs.format.header import Meta

from support.bad_snapshots import CASES, bad_inputs, make_good_snapshot
from support.data import sha256_file, staging_files, write_image
from support.runners import run_mirenfs


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Meta, int]:
    """A valid snapshot of a small image with text, random data and a hole."""
    return make_good_snapshot(
        tmp_path_factory.mktemp("good"),
        [("text", 200_000), ("data", 150_000), ("hole", 300_000), ("text", 5)],
        "--name",
        "good",
    )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("via", ["file", "stdin"])
def test_bad_snapshot_is_refused_and_image_untouched(
    case: str, via: str, good: tuple[bytes, Meta, int], tmp_path: Path
) -> None:
    data, meta, header_len = good
    snapshot, reason = bad_inputs(data, meta, header_len)[case]
    bad = tmp_path / "bad.mirn"
    bad.write_bytes(snapshot)
    image = tmp_path / "disk.img"
    write_image(image, [("text", 100_000), ("hole", 50_000)], seed=3)
    before, before_stat = sha256_file(image), image.stat()

    if via == "file":
        result = run_mirenfs("restore", str(bad), "--image", str(image), "--force")
    else:
        result = run_mirenfs("restore", "-", "--image", str(image), "--force", input=snapshot)

    assert result.returncode == 1
    message = result.stderr.decode()
    assert message.startswith("mirenfs: error: ") and message.count("\n") == 1, message
    assert re.search(reason, message), message
    assert sha256_file(image) == before
    assert image.stat().st_mtime_ns == before_stat.st_mtime_ns and image.stat().st_ino == before_stat.st_ino
    assert staging_files(tmp_path) == []
    assert result.stdout == b""


@pytest.mark.parametrize("case", CASES)
def test_bad_snapshot_into_a_new_image_creates_nothing(
    case: str, good: tuple[bytes, Meta, int], tmp_path: Path
) -> None:
    data, meta, header_len = good
    snapshot, _reason = bad_inputs(data, meta, header_len)[case]
    bad = tmp_path / "bad.mirn"
    bad.write_bytes(snapshot)
    result = run_mirenfs("restore", str(bad), "--image", str(tmp_path / "new.img"))
    assert result.returncode == 1
    assert sorted(os.listdir(tmp_path)) == ["bad.mirn"]


def test_bad_snapshot_fails_verify(good: tuple[bytes, Meta, int], tmp_path: Path) -> None:
    data, meta, header_len = good
    cases = bad_inputs(data, meta, header_len)
    assert sorted(cases) == sorted(CASES)
    for case, (snapshot, _reason) in cases.items():
        bad = tmp_path / "bad.mirn"
        bad.write_bytes(snapshot)
        result = run_mirenfs("verify", str(bad))
        assert result.returncode == 1, case
        assert b"OK" not in result.stdout, case
