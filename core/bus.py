"""In-process wake-ups for readers of the event log (the live stream, webhooks).

Writers call ``notify()`` after they commit events; readers ``wait()`` with a timeout and then read
the log itself, so events written by other processes are still found by the polling timeout.
"""

from __future__ import annotations

import asyncio


class EventBus:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
