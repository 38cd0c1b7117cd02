"""The event loop every service runs on: asyncio's own, or uvloop (CLOUDACH_EVENT_LOOP=uvloop).

uvloop is a libuv event loop for asyncio; its gain here is small (docs/benchmarks.md measures
both: the per-message cost is grpc.aio's and aiohttp's, not the loop's), so asyncio's stays the
default and uvloop is an option for those who measure otherwise on their machines.
"""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger(__name__)
CHOICES = ("asyncio", "uvloop")


def choose_loop() -> str:
    """Sets the event loop policy named by CLOUDACH_EVENT_LOOP before any loop is made; returns it."""
    choice = os.environ.get("CLOUDACH_EVENT_LOOP", "asyncio") or "asyncio"
    if choice not in CHOICES:
        raise SystemExit(f"CLOUDACH_EVENT_LOOP must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise SystemExit("CLOUDACH_EVENT_LOOP=uvloop needs the uvloop package: pip install uvloop") from None
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return choice
