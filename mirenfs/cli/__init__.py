"""The ``mirenfs`` command line (SPEC §4): the parsers, and the one edge where errors become words.

Every command runs the same trio engine the mount uses. Each command group
is one module, its parser beside its handler (``snapshot_cmds``,
``disk_cmds``, ``mount_cmds``, ``demo``). Any failure leaves :func:`main` as
one line, ``mirenfs: error: …``, and exit status 1; nothing else here
prints errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from mirenfs.cli import demo, disk_cmds, mount_cmds, snapshot_cmds
from mirenfs.engine.aio import meaningful_error
from mirenfs.errors import MirenfsError

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirenfs",
        description="Back up and restore Miren disk images as .mirn snapshots.",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default: info for mount (one line per event), warning otherwise",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    snapshot_cmds.register(commands)
    disk_cmds.register(commands)
    mount_cmds.register(commands)
    demo.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level is None:
        args.log_level = "info" if args.command in ("mount", "demo") else "warning"
    logging.basicConfig(level=args.log_level.upper(), format="mirenfs: %(levelname)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("mirenfs: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # one line for people, whatever went wrong
        error = meaningful_error(exc)
        if isinstance(error, (SystemExit, KeyboardInterrupt)):
            raise
        if isinstance(error, MirenfsError):
            message = str(error)
        elif isinstance(error, OSError):
            message = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
        else:
            log.debug("unexpected error", exc_info=error)
            message = f"unexpected {type(error).__name__}: {error}"
        print(f"mirenfs: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
