"""trio helpers shared by the engine, the CLI and the mount."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio

from mirenfs.errors import MirenfsError


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def meaningful_error(error: BaseException) -> BaseException:
    """The one error a person should see from a (possibly nested) exception group.

    An interrupt (Ctrl-C, SystemExit) beats everything, so that it is never lost to an error a
    sibling raised while it was cancelled (review F); then a MirenfsError beats any other
    error, which beats the cancellations that sibling tasks raise once the first one failed.
    """
    leaves = _leaves(error)
    for kind in ((KeyboardInterrupt, SystemExit), MirenfsError, Exception):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0]


@contextlib.asynccontextmanager
async def task_group() -> AsyncIterator[trio.Nursery]:
    """A nursery whose failure surfaces as its most meaningful single error."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        error = meaningful_error(group)
        # An interrupt is raised afresh: its traceback would keep the tasks' frames, and the
        # async generators suspended in them, alive past trio.run, whose hooks then complain.
        if isinstance(error, KeyboardInterrupt):
            error = KeyboardInterrupt()
        elif isinstance(error, SystemExit):
            error = SystemExit(error.code)
        raise error from None
