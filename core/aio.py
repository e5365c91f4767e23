"""Small asyncio helpers shared by the long-running loops."""

from __future__ import annotations

import asyncio
import os


async def cancel(task: asyncio.Task | None) -> None:
    """Cancel a background loop and wait until it has stopped."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


async def finish(task: asyncio.Task | None, timeout: float = 10.0) -> None:
    """Wait for a loop that was asked to stop to finish its current step, then cancel it if it
    has not. Cancelling in the middle of a database call would leave the call running in the
    driver's thread after the event loop is gone."""
    if task is None or task.done():
        return
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        await cancel(task)


#: ``TRACKRELAY_EVENT_LOOP``: which event loop `trackrelay serve` (and the tracker's event writer
#: process) runs on — ``uvloop`` (required), ``asyncio`` (the standard library's), or unset/``auto``:
#: uvloop when it is installed (a dependency of the package), else asyncio's.
EVENT_LOOP_ENV = "TRACKRELAY_EVENT_LOOP"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def loop_factory():
    """The event loop factory ``TRACKRELAY_EVENT_LOOP`` chooses: ``uvloop.new_event_loop``, or None
    for asyncio's default loop. ValueError for another value, ImportError for ``uvloop`` when
    uvloop is not installed."""
    choice = os.environ.get(EVENT_LOOP_ENV, "").strip().lower() or "auto"
    if choice not in EVENT_LOOPS:
        raise ValueError(f"{EVENT_LOOP_ENV} must be one of {', '.join(EVENT_LOOPS)}, got {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


def run(main):
    """``asyncio.run(main)`` on the loop ``loop_factory`` chooses."""
    factory = loop_factory()
    if factory is None:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def loop_name() -> str:
    """The running loop's kind, for the log: ``uvloop`` or ``asyncio``."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
