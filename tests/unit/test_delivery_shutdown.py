"""The edge's usage deliverer stops when cancelled, whenever the cancellation lands.

On Python 3.11, asyncio.wait_for swallowed a cancellation that arrived just as its inner wait
finished; the deliverer then looped on and the edge's shutdown waited for it forever (the suite's
intermittent stall)."""

from __future__ import annotations

import asyncio

import pytest

from cloudach.outbox import UsageOutbox, deliver_forever


@pytest.mark.parametrize("yields", range(4))
async def test_cancelling_the_deliverer_as_it_is_woken_stops_it(tmp_path, yields):
    outbox = UsageOutbox(str(tmp_path / "outbox.db"))
    await outbox.open()
    try:
        for _ in range(5):
            wake = asyncio.Event()
            deliverer = asyncio.create_task(deliver_forever(outbox, None, None, wake))
            await asyncio.sleep(0.05)  # now waiting to be woken
            wake.set()
            for _ in range(yields):
                await asyncio.sleep(0)
            deliverer.cancel()
            done, _ = await asyncio.wait([deliverer], timeout=3)
            assert done, "the deliverer outlived its cancellation"
            assert deliverer.cancelled()
    finally:
        await outbox.close()
