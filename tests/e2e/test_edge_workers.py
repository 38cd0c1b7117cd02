"""`cloudach up --edge-workers 2`: two edge processes behind one port (SO_REUSEPORT), as on a host
with a core for each. Requests on fresh connections are spread over both; each worker bills its
own through its own outbox, and billing_svc's ledger holds every request once; with one worker
SIGKILLed, new connections all reach the other while the launcher restarts it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request

import openai
import pytest

from tests.e2e.conftest import MODEL, launch_stack
from tests.e2e.test_faults import _ledger

WORKERS = ("edge-w1", "edge-w2")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from launch_stack(tmp_path_factory, {}, ("--edge-workers", "2"))


def _metrics_port(pid: int) -> int:
    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"CLOUDACH_EDGE_METRICS_PORT=")).split(b"=", 1)[1])


def _completions_served(pid: int) -> int:
    """The worker's count of chat completions answered 200 (its own /metrics)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{_metrics_port(pid)}/metrics", timeout=5).read().decode()
    return int(sum(float(m.group(1)) for m in re.finditer(
        r'^cloudach_edge_requests_total\{[^}]*route="/v1/chat/completions"[^}]*status="200"[^}]*\} (\S+)$', text, re.M)))


async def _ask(stack) -> str:
    """One short completion on a connection of its own (a new client): its id."""
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=stack.dev_key, max_retries=0, timeout=120)
    try:
        reply = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=2)
        return reply.id
    finally:
        await client.close()


def _recorded(stack, ids: list[str], within_s: float = 30) -> dict[str, tuple]:
    deadline = time.monotonic() + within_s
    while True:
        ledger = _ledger(stack)
        if all(i in ledger for i in ids) or time.monotonic() > deadline:
            return ledger
        time.sleep(0.5)


async def test_two_workers_share_the_port_and_each_bills_its_own(stack):
    services = stack.services()
    assert set(WORKERS) <= set(services), services.keys()
    ids = [await _ask(stack) for _ in range(16)]
    served = {name: _completions_served(services[name]["pid"]) for name in WORKERS}
    assert sum(served.values()) == 16 and all(served.values()), served  # the kernel spread them
    ledger = _recorded(stack, ids)
    assert all(ledger.get(i, (None,) * 4)[2:4] == ("completed", "edge") for i in ids), [ledger.get(i) for i in ids]
    outboxes = sorted(p.name for p in (stack.state_dir / "data").glob("edge-outbox*.db"))
    assert outboxes == ["edge-outbox-w1.db", "edge-outbox-w2.db"]


async def test_with_one_worker_killed_the_other_takes_every_new_connection(stack):
    victim = stack.services()["edge-w2"]["pid"]
    os.kill(victim, signal.SIGKILL)
    ids = await asyncio.gather(*(_ask(stack) for _ in range(8)))  # while the launcher restarts it
    assert len(set(ids)) == 8
    ledger = _recorded(stack, list(ids))
    assert all(i in ledger for i in ids)
    deadline = time.monotonic() + 60
    while stack.services()["edge-w2"]["pid"] == victim and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert stack.services()["edge-w2"]["pid"] != victim  # restarted
