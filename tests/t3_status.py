"""What ``mirenfs status`` hears from a mount (the root's ``user.mirenfs.status``), driven in-process:
a disk's index goes ``not built`` -> ``building`` -> ``ready``, never back (issue 10: an operator
watching ``--index-at-mount`` saw ``building``, ``not built``, ``ready``)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import trio

from mirenfs.mount.inodes import ROOT_INODE
from mirenfs.mount.status import STATUS_XATTR

from support.fuse_ops import InProcessMount, add_image_disk, operations, trio_test


async def index_state(m: InProcessMount, name: str) -> str:
    status: dict[str, Any] = json.loads((await m.xattrs(ROOT_INODE))[STATUS_XATTR])
    return str(status["disks"][name]["index"])


@trio_test
async def test_the_index_is_building_until_it_is_ready(tmp_path: Path) -> None:
    add_image_disk(tmp_path, "pg")
    async with operations(tmp_path) as m:
        assert await index_state(m, "pg") == "not built"
        saving, go_on = threading.Event(), threading.Event()
        save = m.ops.service.cache.save

        def slow_save(*args: Any) -> None:  # the moment after the pass, before the version is installed
            saving.set()
            go_on.wait(timeout=30)
            save(*args)

        m.ops.service.cache.save = slow_save  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(m.lookup, "pg.mirn")  # the first stat: runs the index pass
            try:
                assert await trio.to_thread.run_sync(saving.wait, 30), "the index pass never ended"
                between = await index_state(m, "pg")
            finally:
                go_on.set()
        assert await index_state(m, "pg") == "ready"
        assert between in ("building", "ready"), between
