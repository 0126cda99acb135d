"""The fleet catalogue figures: ``ls -l`` of a mount whose etcd catalogue holds 1,000 disks,
20 of them on the mount's node (issue 14: under a second).

A private etcd (Debian's etcd-server on 127.0.0.1, free ports, a scratch data
directory) is started for these figures and always stopped. 980 disks on 49
other nodes are written through the library (records only: their images are
on those nodes), and 20 small images on this node are registered. The mount's
first ``ls -l`` builds the 20 indexes (untimed); then ``ls -l`` is timed warm
(the listing comes from the mount's copy of the catalogue, fed by a watch: no
request reaches etcd), and right after each remount (one listing of all 1,000
records from etcd, then the persisted indexes). ``disk list --all-nodes`` is
shown for reference: one range request for every record, from the CLI.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.context import CHILD_ENV, CommandFailed, Context, Figure, log, run_command
from bench.mount import fresh_dir, running_mount
from mirenfs.disks.catalogs import open_catalog

TOTAL_DISKS = 1000
LOCAL_DISKS = 20
OTHER_NODES = 49
NODE = "bench-node"
IMAGE_SIZE = 8 << 20
LS_LIMIT_S = 1.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def private_etcd() -> Iterator[str]:
    """One etcd member on 127.0.0.1 with free ports and a scratch data directory; its endpoint.
    Always stopped, and its directory removed, on the way out."""
    etcd = shutil.which("etcd")
    if etcd is None:
        raise CommandFailed("etcd is not installed (scripts/install-deps.sh installs etcd-server)")
    scratch = Path(tempfile.mkdtemp(prefix="mirenfs-bench-etcd-"))
    client, peer = _free_port(), _free_port()
    endpoint = f"127.0.0.1:{client}"
    with open(scratch / "etcd.log", "wb") as log_file:
        process = subprocess.Popen(
            [
                etcd, "--name", "bench", "--data-dir", str(scratch / "data"),
                "--listen-client-urls", f"http://{endpoint}", "--advertise-client-urls", f"http://{endpoint}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"bench=http://127.0.0.1:{peer}",
                "--logger", "zap", "--log-level", "error",
            ],
            stdout=log_file, stderr=log_file, stdin=subprocess.DEVNULL, env=CHILD_ENV,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", client), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise CommandFailed(
                        f"etcd did not start: {(scratch / 'etcd.log').read_text()[-500:]}"
                    ) from None
                time.sleep(0.02)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        shutil.rmtree(scratch, ignore_errors=True)


def populate(ctx: Context, url: str, data: Path) -> list[str]:
    """980 disks on other nodes and 20 with small images here; the names of this node's disks."""
    images = fresh_dir(ctx, "catalog-images")
    started = time.monotonic()
    for node_number in range(1, OTHER_NODES + 1):
        other = open_catalog(url, str(data), node=f"node-{node_number:02d}")
        for disk in range((TOTAL_DISKS - LOCAL_DISKS) // OTHER_NODES):
            other.add_disk(f"n{node_number:02d}-disk-{disk:02d}", size_bytes=10 << 30, filesystem="ext4")
    here = open_catalog(url, str(data), node=NODE)
    local = []
    for disk in range(LOCAL_DISKS):
        image = images / f"local-{disk:02d}.img"
        with open(image, "wb") as f:  # sparse, with a little data: its index pass is quick
            f.truncate(IMAGE_SIZE)
            f.write(os.urandom(64 << 10))
        name = f"local-{disk:02d}"
        here.add_disk(name, size_bytes=IMAGE_SIZE, filesystem="ext4", image_path=str(image))
        local.append(name)
    count = len(here.list_disks())
    log(f"  wrote {count} disks to the catalogue in {time.monotonic() - started:.1f} s (untimed)")
    ctx.check(f"the catalogue holds {TOTAL_DISKS} disks", count == TOTAL_DISKS, str(count))
    return local


def measure_catalog(ctx: Context) -> None:
    """ls -l of a mount on a 1,000-disk etcd catalogue, 20 disks on its node."""
    log(f"catalogue: ls -l of a mount whose etcd catalogue holds {TOTAL_DISKS} disks ({LOCAL_DISKS} here)")
    with private_etcd() as endpoint:
        url = f"etcd://{endpoint}/bench"
        data, mountpoint = fresh_dir(ctx, "catalog-data"), fresh_dir(ctx, "catalog-mnt")
        local = populate(ctx, url, data)
        with running_mount(ctx, data, mountpoint, "--catalog", url, "--node", NODE) as mount:
            first = run_command(["ls", "-l", str(mountpoint)])  # builds the 20 indexes: untimed
            log(f"  first ls -l (index passes of {LOCAL_DISKS} disks) took {first.seconds:.2f} s (untimed)")
            listed = subprocess.run(["ls", str(mountpoint)], capture_output=True, text=True, timeout=60)
            expected = sorted(
                [f"{n}.mirn" for n in local] + [f"{n}.mirn.sha256" for n in local] + ["restore"]
            )
            ctx.check(
                f"the mount shows exactly this node's {LOCAL_DISKS} disks",
                sorted(listed.stdout.split()) == expected,
                f"{len(listed.stdout.split())} entries",
            )
            ls_command = ctx.command(["ls", "-l", str(mountpoint)])
            ctx.add(
                Figure(
                    f"catalogue: ls -l, {TOTAL_DISKS} disks in etcd ({LOCAL_DISKS} here)",
                    ctx.time_runs(ls_command),
                    limit=LS_LIMIT_S,
                )
            )
            ctx.add(
                Figure(
                    "catalogue: ls -l right after a remount",
                    ctx.time_runs(ls_command, before=lambda: mount.restart(forget_index=False)),
                    limit=LS_LIMIT_S,
                )
            )
        listing = ctx.mirenfs_cmd(
            "disk", "list", "--all-nodes", "--catalog", url, "--node", NODE, "--data-path", str(data)
        )
        ctx.add(
            Figure(
                f"catalogue: mirenfs disk list --all-nodes ({TOTAL_DISKS} disks)",
                ctx.time_runs(ctx.command(listing)),
                note="info",
            )
        )
