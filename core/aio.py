"""Small asyncio helpers shared by the long-running loops."""

from __future__ import annotations

import asyncio


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
