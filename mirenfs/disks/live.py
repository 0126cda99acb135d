"""Is an image in use: loop devices backed by it (``/sys/block/loop*/loop/backing_file``).

Blocking reads of ``/sys``; run from worker threads in trio. When it cannot
tell, it says so (:class:`LiveCheckError`) rather than guessing "not live":
restore fails closed on that.
"""

from __future__ import annotations

import os

from mirenfs.errors import LiveCheckError

SYS_BLOCK = "/sys/block"  # where loop devices tell their backing files; tests point it elsewhere
_DELETED_SUFFIX = " (deleted)"


def loop_devices_backing(image_path: str, *, sys_block: str | None = None) -> list[str]:
    """The loop devices (``loop3``, …) whose backing file is ``image_path``.

    Compared by device and inode where the backing file can be stat'ed (so a
    different spelling of the path still matches) and by path otherwise (a
    deleted backing file). Raises :class:`LiveCheckError` when it cannot tell.
    """
    sys_block = SYS_BLOCK if sys_block is None else sys_block
    try:
        image_stat: os.stat_result | None = os.stat(image_path)
    except FileNotFoundError:
        image_stat = None
    except OSError as exc:
        raise LiveCheckError(f"cannot stat {image_path}: {exc.strerror}") from None
    wanted = os.path.realpath(image_path)
    try:
        entries = sorted(name for name in os.listdir(sys_block) if name.startswith("loop"))
    except OSError as exc:
        raise LiveCheckError(f"cannot list loop devices in {sys_block}: {exc.strerror}") from None
    found = []
    for device in entries:
        try:
            with open(os.path.join(sys_block, device, "loop", "backing_file"), encoding="utf-8") as text:
                backing = text.read().rstrip("\n")
        except FileNotFoundError:
            continue  # a loop device with nothing attached (or detached meanwhile)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise LiveCheckError(f"cannot read the backing file of {device}: {reason}") from None
        if _same_file(backing, wanted, image_stat):
            found.append(device)
    return found


def _same_file(backing: str, wanted: str, image_stat: os.stat_result | None) -> bool:
    candidates = [backing]
    if backing.endswith(_DELETED_SUFFIX):
        candidates.append(backing.removesuffix(_DELETED_SUFFIX))
    for candidate in candidates:
        if os.path.realpath(candidate) == wanted:
            return True
    if image_stat is None:
        return False
    try:
        backing_stat = os.stat(backing)
    except OSError:
        return False
    return (backing_stat.st_dev, backing_stat.st_ino) == (image_stat.st_dev, image_stat.st_ino)


def image_is_live(image_path: str, *, sys_block: str | None = None) -> bool:
    """True when a loop device is backed by the image; raises :class:`LiveCheckError` if unsure."""
    return bool(loop_devices_backing(image_path, sys_block=sys_block))


def may_change_while_read(image_path: str) -> bool:
    """Whether an index pass must read each byte once (``build_index(single_read=...)``).

    A live image is expected to change under the pass: reading once keeps
    hash and frames in agreement (a torn but valid snapshot). When liveness
    cannot be told, the answer is yes too.
    """
    try:
        return image_is_live(image_path)
    except LiveCheckError:
        return True
