"""The fuzz tier (issue 11): hundreds of mutated snapshots through the engine, in-process, in seconds.

Every case of :func:`support.fuzz.corpus` (seeded: the same bytes every run) goes through
``verify_file`` and through ``restore_to_path`` over an existing image, fed in pieces of random
sizes. For each the outcome must match the independent oracle (its own header check, ``zstd
-dc``, the size and the SHA-256); a refusal must be a mirenfs error (never a traceback), leave the
old image byte-identical (same inode, same bytes) and no staging file; an accepted case must
give exactly the oracle's image; no pipeline thread may outlive its case. Failures are collected
per family and reported together, each with the case's name.
"""

from __future__ import annotations

import os
import random
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from mirenfs.engine.consume import restore_to_path
from mirenfs.engine.files import verify_file
from mirenfs.errors import MirenfsError

from support.data import sha256_file, staging_files
from support.fuzz import FAMILIES, SEED, Case, Oracle, Verdict, corpus, pieces
from support.streams import restore_threads

OLD_IMAGE = random.Random(5).randbytes(64 << 10)  # what every refused restore must leave in place


@dataclass(frozen=True)
class Judged:
    case: Case
    verdict: Verdict


@pytest.fixture(scope="module")
def judged_corpus() -> tuple[Judged, ...]:
    """The corpus with the oracle's verdict on each case, built once for this module (and let go
    after it: a few hundred snapshots in memory)."""
    oracle = Oracle()
    return tuple(Judged(case, oracle(case.data)) for case in corpus(SEED))


async def _chunks(data: bytes, rng: random.Random) -> AsyncIterator[bytes]:
    for piece in pieces(data, rng):
        yield piece


def _outcome(error: BaseException | None) -> str:
    if error is None:
        return "accepted"
    if isinstance(error, MirenfsError):
        return "refused"
    return "crashed: " + "".join(traceback.format_exception_only(error)).strip()


async def _check_case(judged: Judged, work: Path, rng: random.Random) -> list[str]:
    """Every property of one case; the problems found (none when all hold)."""
    case, verdict = judged.case, judged.verdict
    problems: list[str] = []
    expected = "accepted" if verdict.accepted else "refused"
    snapshot = work / "case.mirn"
    snapshot.write_bytes(case.data)
    image = work / "image.img"
    image.write_bytes(OLD_IMAGE)
    before = os.stat(image)

    error: BaseException | None = None
    try:
        await verify_file(str(snapshot))
    except Exception as exc:
        error = exc
    # verify also checks a seek table at the end, which a restore ignores (SPEC §2: skippable frames)
    verified = "refused" if verdict.seek_table else expected
    reason = verdict.seek_table or verdict.reason
    if _outcome(error) != verified:
        problems.append(f"verify {_outcome(error)}, the oracle says {verified} ({reason}): {error}")

    error = None
    try:
        await restore_to_path(str(image), _chunks(case.data, rng), overwrite=True)
    except Exception as exc:
        error = exc
    if _outcome(error) != expected:
        problems.append(f"restore {_outcome(error)}, the oracle says {expected} ({verdict.reason}): {error}")
    if error is None:
        if (image.stat().st_size, sha256_file(image)) != (verdict.size_bytes, verdict.sha256):
            problems.append("the restored image is not the oracle's")
    else:
        after = os.stat(image)
        if image.read_bytes() != OLD_IMAGE or (after.st_ino, after.st_mtime_ns) != (
            before.st_ino,
            before.st_mtime_ns,
        ):
            problems.append("a refused restore changed the old image")
    if staging_files(work):
        problems.append(f"staging files left: {staging_files(work)}")
    if restore_threads():
        problems.append(f"pipeline threads left: {restore_threads()}")
    return problems


@pytest.mark.parametrize("family", FAMILIES)
def test_every_case_matches_the_oracle_and_loses_nothing(
    family: str, tmp_path: Path, judged_corpus: tuple[Judged, ...]
) -> None:
    cases = [judged for judged in judged_corpus if judged.case.family == family]
    assert cases, f"the corpus has no {family} cases"
    rng = random.Random(f"{SEED}-{family}")
    failures: list[str] = []

    async def run() -> None:
        for judged in cases:
            for problem in await _check_case(judged, tmp_path, rng):
                failures.append(f"{judged.case.id}: {problem}")

    trio.run(run)
    assert not failures, f"{len(failures)} problems in {len(cases)} {family} cases:\n" + "\n".join(failures)


def test_the_corpus_is_seeded_varied_and_quick(judged_corpus: tuple[Judged, ...]) -> None:
    """Deterministic (the same seed, the same bytes), hundreds of cases, both outcomes well covered."""
    started = time.monotonic()
    again = corpus(SEED)
    assert time.monotonic() - started < 10
    cases = judged_corpus
    assert [c.case.data for c in cases] == [case.data for case in again]
    assert len(cases) >= 300
    accepted = sum(c.verdict.accepted for c in cases)
    assert accepted >= 40 and len(cases) - accepted >= 200, accepted
    assert {c.case.family for c in cases} == set(FAMILIES)
    assert [c.verdict.accepted for c in cases if c.case.family == "valid"] == [True, True]
