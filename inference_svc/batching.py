"""Events read ahead of the caller's stream and sent in groups while it lags.

A gRPC message costs about 75 µs of CPU on each side, whatever it carries; a token's event costs
a few. So while the write of one message to the caller is in flight (the caller's event loop is
busy, or the model outruns the stream), a task reads the generation's next events, and the next
message carries every event ready by then. A caller that keeps up gets one event per message and
nothing waits: an event ready is sent at once, never held for company.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")

#: events read ahead at most (then the reading waits for the caller): bounds memory and a message's size
MAX_AHEAD = 256


async def read_ahead(events: AsyncIterator[T], limit: int = MAX_AHEAD) -> AsyncIterator[list[T]]:
    """Yields, in order, lists of the events ready at each moment (1 to limit of them). An error
    of events is raised after the events before it; closing this generator (its caller cancelled)
    stops the reading, which closes events."""
    ready: list[T] = []
    more, room = asyncio.Event(), asyncio.Event()
    room.set()
    failure: list[BaseException] = []
    done = False

    async def pump() -> None:
        nonlocal done
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    ready.append(event)
                    more.set()
                    if len(ready) >= limit:
                        room.clear()
                        await room.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # noqa: BLE001 - handed to the reader, who raises it
            failure.append(error)
        finally:
            done = True
            more.set()

    reader = asyncio.create_task(pump())
    try:
        while True:
            if not ready:
                if done:
                    break
                more.clear()
                await more.wait()
                continue
            group, ready = ready, []
            room.set()
            yield group
        if failure:
            raise failure[0]
    finally:
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
