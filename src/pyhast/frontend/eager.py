"""Eager start of request coroutines, shared by the NBD and FUSE servers.

A request handler is a coroutine.  Most requests complete without ever
suspending (page-cache I/O, a reply already there), so creating an asyncio
task for each would cost more than the request.  :func:`start_eager` runs
the coroutine by hand until it first suspends and only then wraps the rest
in a task (the idea of Python 3.12's eager task factory, for 3.11).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

__all__ = ["start_eager"]


def _resume(coro: Coroutine[Any, Any, None], first: Any) -> Generator[Any, Any, None]:
    """Run the rest of a coroutine that was started by hand and suspended.

    ``first`` is what the coroutine yielded when it suspended (the future it
    waits on).  Wrapped in a task, this generator hands ``first`` to the task
    exactly as if the coroutine had yielded it there, then delegates every
    send and throw like ``yield from`` (asyncio accepts generator-based
    coroutines as tasks in 3.11; one frame less than an async wrapper).
    """
    value = first
    while True:
        try:
            sent = yield value
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                value = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                value = coro.send(sent)
            except StopIteration:
                return


def start_eager(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, None],
    tasks: set[asyncio.Task[None]],
) -> None:
    """Run ``coro`` now; if it suspends, finish it as a task kept in ``tasks``.

    An exception raised before the first suspension propagates to the caller.
    """
    try:
        first = coro.send(None)
    except StopIteration:
        return
    task: asyncio.Task[None] = loop.create_task(_resume(coro, first))
    tasks.add(task)
    task.add_done_callback(tasks.discard)
