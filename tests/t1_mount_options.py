"""The options `mount -t mirenfs` and fstab hand over, reduced to what FUSE accepts (no pyfuse3, no mount)."""

from __future__ import annotations

from mirenfs.mount.config import fuse_options


def test_fuse_options_drop_what_belongs_to_mount_and_fstab() -> None:
    given = ["rw,defaults,nofail,_netdev,auto,noauto,user,x-systemd.automount,X-mount.mkdir", "allow_other"]
    assert fuse_options(given) == ["allow_other"]
    assert fuse_options(["ro,nosuid,allow_other,allow_overwrite,comment=x,ro"]) == [
        "ro",
        "nosuid",
        "allow_other",
        "allow_overwrite",
    ]
