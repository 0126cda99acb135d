"""What ``mirenfs status`` hears from a mount (the root's ``user.mirenfs.status``), driven in-process:
a disk's index goes ``not built`` -> ``building`` -> ``ready``, never back (issue 10: an operator
watching ``--index-at-mount`` saw ``building``, ``not built``, ``ready``)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from mirenfs.cli.mount_cmds import format_status
from mirenfs.cli.mountinfo import MountEntry
from mirenfs.errors import CatalogUnreachableError
from mirenfs.mount import catalog as catalog_module
from mirenfs.mount import session as session_module
from mirenfs.mount import versions as versions_module
from mirenfs.mount.inodes import ROOT_INODE
from mirenfs.mount.status import STATUS_XATTR, status_json

from support.fuse_ops import InProcessMount, add_image_disk, operations, trio_test


async def index_state(m: InProcessMount, name: str) -> str:
    status: dict[str, Any] = json.loads((await m.xattrs(ROOT_INODE))[STATUS_XATTR])
    return str(status["disks"][name]["index"])


@trio_test
async def test_status_lists_this_hosts_disks_whose_image_is_not_under_the_data_path(tmp_path: Path) -> None:
    """Trial W: a wrong data path showed "no disks on node X" while X had disks elsewhere."""
    add_image_disk(tmp_path, "pg")
    Path(add_image_disk(tmp_path, "web")).unlink()
    async with operations(tmp_path) as m:
        status: dict[str, Any] = json.loads((await m.xattrs(ROOT_INODE))[STATUS_XATTR])
    assert sorted(status["disks"]) == ["pg"] and status["without_image_here"] == ["web"]


@trio_test
async def test_the_age_of_a_listing_is_the_time_since_the_catalogue_last_confirmed_it() -> None:
    """Trial W: in an outage, status called the listing "42 s old" (the time since the last `ls`)
    when etcd's watch had confirmed it 4 s before."""

    class Confirmed:
        confirmed_age_s = 4.0

        def list_disks(self) -> list[object]:
            return []

    view = catalog_module.CatalogView(catalog_module.StoreCatalog(Confirmed()), lambda _name: None)  # type: ignore[arg-type]
    assert view.listing_age_s is None  # never listed
    await view.disks()
    assert view.listing_age_s == 4.0


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


@trio_test
async def test_disks_waiting_for_a_pass_started_at_mount_are_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial R s18: with --index-at-mount, the disks waiting for a free slot showed "not loaded (the
    first stat or read of the snapshot loads …)", as if nothing would happen until then."""
    names = ["a", "b", "c"]
    for seed, name in enumerate(names):
        add_image_disk(tmp_path, name, seed=seed)
    passing, go_on = trio.Event(), trio.Event()
    build_index = versions_module.build_index

    async def held_build_index(*args: Any, **kwargs: Any) -> Any:
        passing.set()
        await go_on.wait()
        return await build_index(*args, **kwargs)

    monkeypatch.setattr(versions_module, "build_index", held_build_index)
    async with operations(tmp_path) as m:
        service = m.ops.service
        service._pass_limit = trio.CapacityLimiter(1)  # one at a time: the others must wait
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session_module._index_every_disk, m.ops)
            try:
                with trio.fail_after(30):
                    await passing.wait()
                states = sorted([await index_state(m, name) for name in names])
                status: dict[str, Any] = json.loads((await m.xattrs(ROOT_INODE))[STATUS_XATTR])
            finally:
                go_on.set()
        assert states == ["building", "queued", "queued"], states
        assert [await index_state(m, name) for name in names] == ["ready"] * 3
        assert not service.queued
    text = format_status(MountEntry(0, (0, 0), "/mnt", "fuse.mirenfs", str(tmp_path), "rw"), status)
    queued = "queued (--index-at-mount: its index is loaded or built once a slot is free, 2 at a time)"
    assert len([line for line in text.splitlines() if line.endswith(queued)]) == 2, text


@trio_test
async def test_status_answers_while_the_catalogue_is_unreachable_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An etcd outage fails every listing; the status still answers from the mount's last listing
    and its own state, and says why the catalogue could not be listed (issue: status gave EIO)."""
    add_image_disk(tmp_path, "pg")
    unreachable = "the disk catalogue at etcd://127.0.0.1:2379/fleet is unreachable (connection refused)"
    monkeypatch.setattr(catalog_module, "CATALOG_TTL_S", 0.0)  # every status asks the catalogue
    async with operations(tmp_path) as m:
        await m.lookup("pg.mirn")  # the index is built: ready
        before = json.loads((await m.xattrs(ROOT_INODE))[STATUS_XATTR])
        assert before["catalog_error"] is None and "listing_age_s" not in before
        assert (before["catalog"], before["node"]) == (f"sqlite://{tmp_path}", None)

        def down() -> dict[str, object]:
            raise CatalogUnreachableError(unreachable)

        monkeypatch.setattr(m.ops.catalog.catalog, "visible_disks", down)
        with pytest.raises(pyfuse3.FUSEError):  # a lookup still fails closed
            await m.lookup("pg.mirn")
        status: dict[str, Any] = json.loads((await m.xattrs(ROOT_INODE))[STATUS_XATTR])
        assert status["catalog_error"] == unreachable
        assert status["disks"] == before["disks"] and status["disks"]["pg"]["index"] == "ready"
        assert isinstance(status["listing_age_s"], float) and status["listing_age_s"] >= 0
        text = format_status(
            MountEntry(0, (0, 0), str(tmp_path / "mnt"), "fuse.mirenfs", str(tmp_path), "rw"), status
        )
        assert f"\n  {unreachable}\n  (the disks below are from the mount's last listing" in text
        assert "  pg    ready (offline" in text


def test_status_names_the_catalogue_and_node_and_whose_disks_it_found_none_of() -> None:
    """A wrong --node mounts fine and shows no disks: status says which catalogue and node it used."""
    entry = MountEntry(0, (0, 0), "/mnt/disks", "fuse.mirenfs", "/var/lib/miren", "rw")
    status = {"pid": 1, "catalog": "etcd://127.0.0.1:2379/fleet", "node": "hosta", "catalog_error": None}
    text = format_status(entry, status)
    assert text.splitlines()[0] == (
        "/mnt/disks: mirenfs, data path /var/lib/miren, disk catalogue etcd://127.0.0.1:2379/fleet, "
        "node hosta, pid 1"
    )
    assert "\n  no disks on node hosta in etcd://127.0.0.1:2379/fleet\n" in text
    # Trial W: the node had disks, with their images under another data path: said so.
    said = (
        "\n  2 of node hosta's disks have no image under this data path (web, web2): if the data path or "
        "the node name is wrong, stop this mount\n"
    )
    assert said not in text
    status["without_image_here"] = ["web", "web2"]
    assert said in format_status(entry, status)
    for passes, shown in ((1, "1 index pass since mounted"), (2, "2 index passes since mounted")):
        assert format_status(entry, {**status, "index_passes": passes}).splitlines()[0].endswith(shown)


@trio_test
async def test_status_shows_what_the_frame_store_holds_and_how_it_served(tmp_path: Path) -> None:
    """Trial N: nothing showed the frame store at work (an unchanged disk served from it after a
    remount logged nothing), nor that it had stopped growing for space."""
    add_image_disk(tmp_path, "pg")
    entry = MountEntry(0, (0, 0), str(tmp_path / "mnt"), "fuse.mirenfs", str(tmp_path), "rw")
    async with operations(tmp_path) as m:
        status: dict[str, Any] = json.loads((await m.xattrs(ROOT_INODE))[STATUS_XATTR])
        assert status["frame_store"]["loaded"] is False and status["frame_store"]["limit"] == 8 << 30
        assert "\n  frame store of up to 8.0G: not used since the mount started" in format_status(
            entry, status
        )
        await m.read_file("pg.mirn")  # a first pass: every data chunk compressed, and stored
        first = json.loads((await m.xattrs(ROOT_INODE))[STATUS_XATTR])["frame_store"]
        # The pass found none of its chunks there; the read then took every frame from it.
        assert first["loaded"] and first["bytes"] > 0 and first["misses"] > 0
        assert first["hits"] == first["misses"]
    async with operations(tmp_path) as m:  # a remount: the index is kept, the frames are stored
        await m.read_file("pg.mirn")
        status = json.loads((await m.xattrs(ROOT_INODE))[STATUS_XATTR])
        again = status["frame_store"]
        assert again["hits"] == first["hits"] and again["misses"] == 0 and again["bytes"] == first["bytes"]
        text = format_status(entry, {**status, "frame_store": {**again, "held_back": True, "corrupt": 2}})
        assert (
            f"\n  frame store {first['bytes'] / 1024:.1f}K of 8.0G; {again['hits']} frames served from it, "
            "0 not found there, 2 that did not verify (compressed again); it stopped growing: its "
            "filesystem has less than 10% free" in text
        ), text
    async with operations(tmp_path, fuse_options=["frame_store_size=0"]) as m:
        status = json.loads((await m.xattrs(ROOT_INODE))[STATUS_XATTR])
        assert status["frame_store"] is None and "frame store" not in format_status(entry, status)


@trio_test
async def test_the_status_of_a_busy_host_fits_an_attribute_and_says_what_it_left_out(tmp_path: Path) -> None:
    """Review: the kernel takes no attribute value over 64 KiB, and the status listed every disk
    and every restore/ entry: after 400 restores (or on a host of 400 disks) ``mirenfs status``
    got "Argument list too long". It now fits: a restore at work always shows, what ended goes
    first, and the status says how much it left out."""
    add_image_disk(tmp_path, "pg")
    async with operations(tmp_path, allow_overwrite=True) as m:
        for n in range(500):  # 500 restores that failed (empty files), each an entry with its reason
            fh, _inode = await m.create(f"gone{n:03}.mirn")
            await m.close(fh)
        receiving, _inode = await m.create("pg.mirn")
        raw = (await m.xattrs(ROOT_INODE))[STATUS_XATTR]
        await m.close(receiving)
    assert len(raw) <= 63 << 10
    status: dict[str, Any] = json.loads(raw)
    shown = [item["name"] for item in status["restores"]]
    assert (
        "restore/pg.mirn" in shown and "restore/gone499.mirn" in shown and "restore/gone000.mirn" not in shown
    )
    assert status["omitted"]["restores"] == 501 - len(shown) and status["omitted"]["disks"] == 0
    assert status["disks"] == {"pg": {"index": "not built"}}
    entry = MountEntry(0, (0, 0), str(tmp_path / "mnt"), "fuse.mirenfs", str(tmp_path), "rw")
    assert (
        f"\n  not shown: {status['omitted']['restores']} ended restores (the status the mount gives is at "
        "most 64 KiB)\n" in format_status(entry, status)
    )


def test_a_status_cut_down_keeps_disks_at_work_and_drops_disks_at_rest_last() -> None:
    """The order things go when the status must shrink: ended restores, old refusals, then disks
    at rest (not built, then ready); a disk being indexed or refused always stays."""
    disks: dict[str, Any] = {f"d{n:04}": {"index": "ready", "checksum": "0" * 64} for n in range(600)}
    disks.update({f"n{n:04}": {"index": "not built"} for n in range(600)})
    disks["busy"] = {"index": "building", "done": 1, "total": 2}
    disks["stuck"] = {"index": "refused", "reason": "in use"}
    refused = [{"name": f"restore/r{n}.mirn", "errno": "EBUSY", "reason": "x" * 40} for n in range(50)]
    status = {"pid": 1, "disks": disks, "restores": [], "refused": refused, "frame_store": None}
    cut: dict[str, Any] = json.loads(status_json(status))
    assert len(status_json(status)) <= 63 << 10
    assert cut["refused"] == [] and cut["omitted"]["refused"] == 50
    assert {"busy", "stuck"} <= set(cut["disks"]) and not any(name.startswith("n") for name in cut["disks"])
    assert cut["omitted"]["disks"] == len(disks) - len(cut["disks"])
    assert json.loads(status_json({**status, "disks": {"pg": {"index": "ready"}}}))["refused"] == refused
