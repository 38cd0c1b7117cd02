"""A request cancelled while the limiter decides gives back what the decision took."""

from __future__ import annotations

import asyncio

import pytest

from edge.ratelimit import Decision, InProcessLimiter, Quota
from edge.serving import admit

QUOTA = Quota(requests_per_minute=0, tokens_per_minute=1000, max_concurrent_streams=1)


class SlowLimiter(InProcessLimiter):
    """The in-process limiter behind a round trip's delay (as Redis has)."""

    async def admit(self, *args, **kw) -> Decision:
        await asyncio.sleep(0.2)
        return await super().admit(*args, **kw)


async def test_a_client_leaving_during_admission_leaves_no_lease_or_reservation():
    limiter = SlowLimiter(window_s=60)
    task = asyncio.create_task(admit(limiter, "key", QUOTA, "req-1", 600, lease_s=600))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The slot is free again and the 600 reserved tokens are back: another request gets both.
    decision = await admit(limiter, "key", QUOTA, "req-2", 900, lease_s=600)
    assert decision.allowed


async def test_without_the_give_back_the_lease_would_have_held_the_slot():
    limiter = SlowLimiter(window_s=60)
    assert (await admit(limiter, "key", QUOTA, "req-1", 10, lease_s=600)).allowed
    refused = await admit(limiter, "key", QUOTA, "req-2", 10, lease_s=600)
    assert not refused.allowed and refused.refused_by == "streams"
