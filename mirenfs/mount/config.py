"""What a mount is asked to be: mount point, data path, disk catalogue and node name, consent to
overwrite, how disks in use are copied (freeze budget, live reads), FUSE options.

No pyfuse3 here: the CLI builds a :class:`MountConfig` (and filters options
the same way ``mount.mirenfs`` does) without loading FUSE.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from mirenfs.disks.catalogs import CatalogSpec, node_from, open_catalog
from mirenfs.disks.model import Catalog, frame_store_directory, state_directory
from mirenfs.disks.pointintime import DEFAULT_FREEZE_BUDGET_S, CopyPolicy
from mirenfs.engine.produce import Settings
from mirenfs.errors import MirenfsError

DEFAULT_SPILL_LIMIT = 4 << 30
DEFAULT_FRAME_STORE_LIMIT = 8 << 30
MIN_FRAME_STORE_LIMIT = 64 << 20  # a smaller bound keeps no pass's frames: each put evicts the last
FRAME_STORE_OPTION = "frame_store_size"  # -o frame_store_size=SIZE: the frame store's bound (0: none)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
FREEZE_BUDGET_OPTION = "freeze_budget"  # -o freeze_budget=SECONDS: longest freeze for a copy (0: never)
LIVE_READS_OPTION = "live_reads"  # -o live_reads: read a disk in use from its moving image if no copy

# mirenfs's own switches that ``mirenfs mount`` also takes as flags (--allow-overwrite, …).
MOUNT_SWITCHES = ("allow_overwrite", "index_at_mount")
# mirenfs's own -o options (taken out before FUSE sees the rest), and the FUSE ones worth
# suggesting when an unknown option is a near miss of one of them.
MIRENFS_OPTIONS = (
    *MOUNT_SWITCHES,
    FRAME_STORE_OPTION,
    FREEZE_BUDGET_OPTION,
    LIVE_READS_OPTION,
)
_KNOWN_FUSE_OPTIONS = (
    "allow_other",
    "allow_root",
    "default_permissions",
    "ro",
    "auto_unmount",
)


# libfuse options that pyfuse3 cannot honour: libfuse would end the session at the kernel's INIT.
_UNSUPPORTED_OPTIONS = {
    "max_read": "mirenfs reads in requests of up to 1 MiB; remove the option",
    # mirenfs sets both: `mirenfs status`, `cleanup` and the second-mount check find its mounts by
    # the type fuse.mirenfs, and status names the data path from fsname (review: a user's won).
    "subtype": "mirenfs names its mounts fuse.mirenfs itself; remove the option",
    "fsname": "mirenfs shows the data path as the mount's source itself; remove the option",
}


def refuse_unsupported(options: Iterable[str]) -> None:
    for option in options:
        reason = _UNSUPPORTED_OPTIONS.get(option.partition("=")[0])
        if reason is not None:
            raise MirenfsError(f"-o {option} is not supported: {reason}")


def check_option_values(options: list[str]) -> None:
    """Refuse now what the mount would refuse: for ``mount.mirenfs -f``, which mounts nothing."""
    _, rest = copy_policy(options)
    _, rest = frame_store_limit(rest)
    refuse_unsupported(rest)
    for_fuse = [option for option in rest if option not in MOUNT_SWITCHES]
    if fuse_refuses(for_fuse):
        raise MirenfsError(refused_options_sentence(for_fuse))


def refused_options_sentence(options: list[str]) -> str:
    """What the mount says when libfuse refuses its ``-o`` options (naming near misses)."""
    given = ",".join(options) or "(none)"
    misses = near_misses(options)
    hint = (
        f"unknown: {'; '.join(misses)}"
        if misses
        else "check the -o options (in the foreground, fuse names the unknown ones on stderr)"
    )
    return f"FUSE refused the mount options {given}; {hint}"


class _FuseArgs(ctypes.Structure):
    _fields_ = (  # struct fuse_args
        ("argc", ctypes.c_int),
        ("argv", ctypes.POINTER(ctypes.c_char_p)),
        ("allocated", ctypes.c_int),
    )


def fuse_refuses(options: list[str]) -> bool:
    """Whether libfuse refuses ``options`` as the mount's start would (``fuse_session_new``, which
    names the unknown ones on stderr), asked of libfuse itself with nothing mounted. False when
    libfuse cannot be loaded: the mount then says so itself."""
    try:
        fuse = ctypes.CDLL(ctypes.util.find_library("fuse3") or "libfuse3.so.3")
    except OSError:
        return False
    fuse.fuse_session_new.restype = ctypes.c_void_p
    fuse.fuse_session_new.argtypes = (
        ctypes.POINTER(_FuseArgs),
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
    )
    fuse.fuse_session_destroy.argtypes = (ctypes.c_void_p,)
    fuse.fuse_opt_free_args.argtypes = (ctypes.POINTER(_FuseArgs),)
    words = [b"mirenfs"] + [word for option in options for word in (b"-o", option.encode())]
    argv = (ctypes.c_char_p * (len(words) + 1))(*words, None)
    args = _FuseArgs(len(words), argv, 0)
    no_operations = ctypes.create_string_buffer(8)  # op_size 0: none is copied
    with _stderr_silenced():  # libfuse's "fuse: unknown option(s)": the caller says it in its words
        session = fuse.fuse_session_new(ctypes.byref(args), no_operations, 0, None)
    if args.allocated:  # libfuse replaced argv with its own copy
        fuse.fuse_opt_free_args(ctypes.byref(args))
    if not session:
        return True
    fuse.fuse_session_destroy(session)
    return False


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Descriptor 2 on /dev/null for the block (a C library's messages go there, not through Python)."""
    if sys.stderr is not None:
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # closed: nothing to silence
        yield
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.dup2(null, 2)
        finally:
            os.close(null)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def near_misses(options: Iterable[str]) -> list[str]:
    """``given (did you mean known?)`` for each option close to a known one: mirenfs takes its
    own options out and hands the rest to FUSE, which refuses an unknown one without naming it."""
    import difflib  # only on this error path

    known = (*MIRENFS_OPTIONS, *_KNOWN_FUSE_OPTIONS)
    found = []
    for option in options:
        key = option.partition("=")[0]
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        if close:
            found.append(f"{key} (did you mean {close[0]}?)")
    return found


# Meaningful to mount(8), fstab or systemd only; FUSE would refuse them as unknown.
DROPPED_OPTIONS = frozenset(
    {"defaults", "rw", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser", "owner", "group"}
    # mount(8)'s generic options, valid on any fstab line, which libfuse refuses (review C); a
    # FUSE mount keeps its times as the daemon gives them, and says what it says.
    | {"relatime", "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime", "silent", "loud"}
)
DROPPED_PREFIXES = ("x-", "X-", "comment=")


def fuse_options(groups: Iterable[str]) -> list[str]:
    """The ``-o`` options to hand to ``mirenfs mount``, in order, without mount(8)'s own."""
    kept: list[str] = []
    for group in groups:
        for option in group.split(","):
            option = option.strip()
            if not option or option in DROPPED_OPTIONS or option.startswith(DROPPED_PREFIXES):
                continue
            if option not in kept:
                kept.append(option)
    return kept


def clone_directory_of(data_path: str) -> str:
    """Point-in-time copies of disks in use: under the data path, beside the images, for reflinks.
    The mount and ``mirenfs backup NAME`` use the same one."""
    return os.path.join(state_directory(data_path), "clones")


def copy_policy(options: list[str]) -> tuple[CopyPolicy, list[str]]:
    """Take mirenfs's own ``freeze_budget=SECONDS`` and ``live_reads`` out of the ``-o`` options
    (FUSE would refuse them); return the policy they set and the options left for FUSE."""
    budget, live_reads, rest = DEFAULT_FREEZE_BUDGET_S, False, []
    for option in options:
        key, _, value = option.partition("=")
        if key == LIVE_READS_OPTION and not value:
            live_reads = True
        elif key == FREEZE_BUDGET_OPTION:
            try:
                budget = float(value)
            except ValueError:
                budget = -1.0
            if not 0 <= budget <= 600:
                raise MirenfsError(
                    f"-o {option}: the freeze budget is a number of seconds from 0 (never freeze) to 600, "
                    f"e.g. {FREEZE_BUDGET_OPTION}={DEFAULT_FREEZE_BUDGET_S:g}"
                )
        else:
            rest.append(option)
    return CopyPolicy(freeze_budget_s=budget, live_reads=live_reads), rest


def size_in_bytes(text: str) -> int | None:
    """Sizes as operators write them: 4096, 512M, 10G, 1T (binary units); None for anything else.
    One parser for ``-o`` options here and the CLI's ``--size``."""
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = cleaned[-1:] if cleaned[-1:] in _SIZE_UNITS else ""
    number = cleaned[: len(cleaned) - len(unit)]
    return int(number) * _SIZE_UNITS[unit] if number.isdigit() else None


def frame_store_limit(options: list[str]) -> tuple[int | None, list[str]]:
    """Take mirenfs's own ``frame_store_size=SIZE`` out of the ``-o`` options (FUSE would refuse
    it); return the size it sets (None when absent) and the options left for FUSE."""
    limit: int | None = None
    rest = []
    for option in options:
        key, _, value = option.partition("=")
        if key != FRAME_STORE_OPTION:
            rest.append(option)
            continue
        limit = size_in_bytes(value)
        if limit is None:
            raise MirenfsError(
                f"-o {option}: the frame store size is a size such as 8G, 500M or 0 (no store)"
            )
        if 0 < limit < MIN_FRAME_STORE_LIMIT:  # `frame_store_size=8` is 8 bytes: not one frame fits
            raise MirenfsError(
                f"-o {option}: the frame store's bound is at least 64M (a smaller one keeps too few "
                "frames to spare any compression, and costs more than none); give a size with its "
                "unit (8G, 500M), or 0 for no store"
            )
    return limit, rest


@dataclass
class MountConfig:
    mountpoint: str
    data_path: str
    allow_overwrite: bool = False
    index_at_mount: bool = False  # start every disk's index pass in the background once mounted
    fuse_options: list[str] = field(default_factory=list)
    settings: Settings = field(default_factory=Settings)
    spill_limit: int = DEFAULT_SPILL_LIMIT
    copy_policy: CopyPolicy = field(default_factory=CopyPolicy)
    frame_store_limit: int = DEFAULT_FRAME_STORE_LIMIT  # bytes; 0: no frame store
    catalog: CatalogSpec | None = None  # None: the SQLite store of the data path
    node: str | None = None  # this host's name in an etcd catalogue (None: the hostname)

    def __post_init__(self) -> None:
        # -o frame_store_size=SIZE is mirenfs's, not FUSE's, whoever built this config.
        limit, self.fuse_options = frame_store_limit(self.fuse_options)
        if limit is not None:
            self.frame_store_limit = limit
        refuse_unsupported(self.fuse_options)

    def open_catalog(self) -> Catalog:
        """The catalogue of disks this mount shows and restores into (not contacted yet)."""
        return open_catalog(self.catalog, self.data_path, node=node_from(self.node))

    @property
    def catalog_name(self) -> str:
        """The catalogue as ``status`` shows it: the etcd URL (never with credentials: those are
        refused), or the data path's SQLite store."""
        if self.catalog is not None and self.catalog.etcd is not None:
            return self.catalog.etcd.url
        return f"sqlite://{os.path.abspath(self.data_path)}"

    @property
    def node_name(self) -> str | None:
        """This host's node name in an etcd catalogue; None with SQLite, where it means nothing."""
        if self.catalog is None or self.catalog.etcd is None:
            return None
        return node_from(self.node)

    @property
    def shared(self) -> bool:
        return "allow_other" in self.fuse_options

    @property
    def state_directory(self) -> str:
        """mirenfs's own files under the data path: index cache and spilled frames."""
        return state_directory(self.data_path)

    @property
    def clone_directory(self) -> str:
        return clone_directory_of(self.data_path)

    @property
    def frame_store_directory(self) -> str:
        """Compressed frames by chunk fingerprint, kept across mounts (bounded by ``frame_store_limit``)."""
        return frame_store_directory(self.data_path)

    def kernel_options(self) -> set[str]:
        # The data path as the source, as in fstab, so `mount -a` sees the line is mounted.
        plain = self.data_path and not any(c in self.data_path for c in ", \t\n")
        options = {f"fsname={self.data_path if plain else 'mirenfs'}", "subtype=mirenfs", *self.fuse_options}
        if self.shared:
            options.add("default_permissions")  # with other users, the kernel checks modes
        return options
