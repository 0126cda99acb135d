"""The ``mirenfs`` command line (SPEC §4): the parsers, and the one edge where errors become words.

Every command runs the same trio engine the mount uses. Each command group
is one module, its parser beside its handler (``snapshot_cmds``,
``disk_cmds``, ``catalog_cmds``, ``mount_cmds``, ``demo``). Any failure leaves :func:`main` as
one line, ``mirenfs: error: …``, and exit status 1; nothing else here
prints errors.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import logging
import os
import re
import signal
import sys
import threading
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from mirenfs.cli import catalog_cmds, demo, disk_cmds, mount_cmds, snapshot_cmds
from mirenfs.cli.common import (
    ProcessEnd,
    add_scope_options_before_command,
    ignore_interrupts_from_now_on,
    settle_scope_options,
)
from mirenfs.engine.aio import meaningful_error
from mirenfs.errors import CatalogUnreachableError, MirenfsError, one_line

log = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]
# What argparse must take as an option's value, not as an unknown option: negative numbers and
# sizes (``--size -5M``), so that the option's own check can say what is wrong with them.
NEGATIVE_VALUE = re.compile(r"^-\d[\d.]*[A-Za-z]*$")
LOG_LEVELS = ["debug", "info", "warning", "error"]
OWN_SIGNAL_HANDLING = ("mount", "demo")  # they unmount cleanly on SIGTERM themselves


class OneLineParser(argparse.ArgumentParser):
    """SPEC §4: errors are one clear line on stderr. argparse printed the command's usage first
    (seven lines for ``mirenfs backup``); the line names the command's ``--help`` instead, and
    guesses what a typo meant (``mirenfs restor``, ``--jsn``). The parsers of the commands are
    made of this class too (argparse makes a subparser of its parent's class)."""

    _refused_choice: tuple[str, list[str]] | None = None  # the last value not among its choices

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """Remember a choice refused, with the choices: argparse's wording of them changes
        between Python releases (quoted, then not), so the guess is not read back from it."""
        if action.choices is not None and value not in action.choices:
            self._refused_choice = (str(value), [str(choice) for choice in action.choices])
        super()._check_value(action, value)

    def error(self, message: str) -> NoReturn:
        guess = self._guess(message)
        then = f"; did you mean `{guess}`? See" if guess else "; see"
        self.exit(2, f"{self.prog}: error: {one_line(message)}{then} `{self.prog} --help`\n")

    def _guess(self, message: str) -> str | None:
        """What is closest to the choice refused (``restor``, ``EXT4``) or to the first option
        not known (``--jsn``, ``--data-pa DIR``), if anything is close."""
        if "invalid choice" in message and self._refused_choice is not None:
            typed, known = self._refused_choice
        elif message.startswith("unrecognized arguments: "):
            typed = message.removeprefix("unrecognized arguments: ").split()[0].partition("=")[0]
            known = [option for option in self._option_string_actions if option.startswith("--")]
            if not typed.startswith("--"):
                return None
        else:
            return None
        by_lower = {choice.lower(): choice for choice in known}
        close = difflib.get_close_matches(typed.lower(), by_lower, n=1)
        return by_lower[close[0]] if close else None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mirenfs",
        description="Back up and restore Miren disk images as .mirn snapshots.",
    )
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    snapshot_cmds.register(commands)
    disk_cmds.register(commands)
    catalog_cmds.register(commands)
    mount_cmds.register(commands)
    demo.register(commands)
    _add_log_level(parser)
    add_scope_options_before_command(parser)  # also before the command: `mirenfs --data-path DIR disk list`
    _remember_command_parsers(parser)
    return parser


def _refuse_unknown(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str], unknown: list[str]
) -> None:
    """Refuse what no parser took, with the usage of the parser it was given to: the command's
    (``mirenfs disk list --jsn``), or the top level's when it came before the command."""
    command_parser = getattr(args, "command_parser", parser)
    where = argv.index(unknown[0]) if unknown[0] in argv else len(argv)
    before_command = args.command not in argv or where < argv.index(args.command)
    (parser if before_command else command_parser).error(f"unrecognized arguments: {' '.join(unknown)}")


def _refuse_unknown_before_command(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """An option the top level does not know, before the command (``mirenfs --data DIR disk
    list``), is named as such: argparse would take it as unknown, then its value as the
    command, and say "invalid choice: 'DIR'" (trial V)."""
    known = parser._option_string_actions
    values_left = 0
    for token in argv:
        if values_left:
            values_left -= 1
            continue
        if not token.startswith("-") or token in ("-", "--"):
            return  # the command: its own parser takes what follows
        name, has_value, _value = token.partition("=")
        action = known.get(name)
        if action is None:
            parser.error(f"unrecognized arguments: {token}")
        if not has_value and action.nargs != 0:
            values_left = 1


def _remember_command_parsers(parser: argparse.ArgumentParser) -> None:
    """Each command's parser, in its own namespace: an option it does not know is refused
    with that command's usage (``mirenfs disk list --jsn``), not the top-level one. Every
    parser takes a negative number or size as a value (no option of ours looks like one), and
    none takes an option by a prefix of its name: ``--allow`` is not consent to overwrite, and a
    prefix that works today would mean another option once one is added."""
    parser._negative_number_matcher = NEGATIVE_VALUE
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in set(action.choices.values()):
                subparser.set_defaults(command_parser=subparser)
                if any(isinstance(a, argparse._SubParsersAction) for a in subparser._actions):
                    add_scope_options_before_command(subparser)  # `mirenfs disk --data-path DIR list`
                _remember_command_parsers(subparser)


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` before the command or after it (``mirenfs mount … --log-level debug``)."""
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help="default: info for mount and demo (one line per event), warning otherwise",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in set(action.choices.values()):
                _add_log_level(subparser)


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked: importing importlib.metadata costs every
    command 25 ms of start-up."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"mirenfs {_version()}")
        parser.exit()


def _version() -> str:
    import importlib.metadata  # here, not at the top: see _VersionAction

    try:
        return importlib.metadata.version("mirenfs")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _quiet_broken_pipe() -> int:
    """A reader that went away (``mirenfs … | head``) ends the command quietly, as with SIGPIPE."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + signal.SIGPIPE


@contextlib.contextmanager
def _terminated_as_interrupted(command: str, finished: list[bool]) -> Iterator[list[int]]:
    """SIGTERM (kill, timeout(1), systemd) ends a command as Ctrl-C does, so that it undoes its
    work the same way: a restore's staging file and a disk it was creating, a backup's partial
    output. Inside trio.run the signal goes through trio's SIGINT handler, which keeps the
    interrupt out of the scheduler's critical sections. Yields the signals received.

    Once ``finished`` holds True (the command said its outcome, and the process ends with it),
    both signals are ignored instead of set back: one in the last milliseconds would end the
    process by that signal, and a script would retry a restore that was done (trial T)."""
    received: list[int] = []
    if command in OWN_SIGNAL_HANDLING or threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_sigterm(signum: int, frame: types.FrameType | None) -> None:
        received.append(signum)
        interrupt = signal.getsignal(signal.SIGINT)
        if callable(interrupt):  # trio's inside trio.run, else Python's: raises, or defers to a checkpoint
            interrupt(signal.SIGINT, frame)
            return
        raise KeyboardInterrupt  # SIGINT set to SIG_DFL by an embedding program: interrupt here

    interrupt_before = signal.getsignal(signal.SIGINT)
    if interrupt_before == signal.SIG_IGN:
        # A background job of a script starts with SIGINT ignored; trio.run then installs no
        # handler for it, and SIGTERM could not reach the command's clean-up through one. Ctrl-C
        # ends a command as cleanly as SIGTERM does, so it is taken back for the command's time.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:
        if finished[0]:
            ignore_interrupts_from_now_on()
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: set in C
            if interrupt_before == signal.SIG_IGN:
                signal.signal(signal.SIGINT, signal.SIG_IGN)


def _interrupted(received: list[int]) -> int:
    if received:
        print("mirenfs: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    print("mirenfs: interrupted", file=sys.stderr)
    return 130


def main(argv: Sequence[str] | None = None, *, process_ends: bool = False) -> int:
    """Run one command; ``process_ends``: the process exits with its status right after (the
    ``mirenfs`` program), so signals that come once the command has finished are ignored."""
    for stream in (sys.stdout, sys.stderr):  # names may hold anything: never fail to print one
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    ProcessEnd.with_the_command = process_ends
    parser = build_parser()
    given = list(sys.argv[1:] if argv is None else argv)
    _refuse_unknown_before_command(parser, given)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _refuse_unknown(parser, args, list(sys.argv[1:] if argv is None else argv), unknown)
    settle_scope_options(parser, args, getattr(args, "command_parser", parser).prog)
    if getattr(args, "log_level", None) is None:
        args.log_level = "info" if args.command in ("mount", "demo") else "warning"
    logging.basicConfig(level=args.log_level.upper(), format="mirenfs: %(levelname)s: %(message)s")
    handler: Handler = args.handler
    finished = [False]
    with _terminated_as_interrupted(args.command, finished) as terminated:
        code: int | None = None
        try:
            code = handler(args)
            sys.stdout.flush()
        except BaseException as exc:  # one line for people, whatever went wrong
            if code is None or not isinstance(exc, KeyboardInterrupt):
                return _said(exc, terminated)
            # A Ctrl-C after the command finished (and said so) changes nothing: its status stands.
        finished[0] = process_ends
        return code


def _said(exc: BaseException, terminated: list[int]) -> int:
    """Print the one line for ``exc`` and return the exit status."""
    error = meaningful_error(exc)
    if isinstance(error, SystemExit):
        raise error
    if isinstance(error, KeyboardInterrupt):
        return _interrupted(terminated)
    if isinstance(error, BrokenPipeError):
        return _quiet_broken_pipe()
    if isinstance(error, MirenfsError):
        message = str(error)
        if (
            isinstance(error, CatalogUnreachableError)
            and error.maybe_applied
            and not error.said_what_may_be_done
            and "may have" not in message
        ):
            message += (  # trial W: a `disk create` said unreachable was there a moment later
                "; the change may have been made all the same (etcd received it and did not answer in "
                "time): check with `mirenfs disk list` once the catalogue answers"
            )
    elif isinstance(error, OSError):
        message = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
    else:
        log.debug("unexpected error", exc_info=error)
        message = f"unexpected {type(error).__name__}: {error}"
    print(f"mirenfs: error: {one_line(message)}", file=sys.stderr)  # a path in it cannot split it
    return 1


if __name__ == "__main__":
    sys.exit(main())
