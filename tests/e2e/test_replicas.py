"""Scale-out on one host, as a cluster runs it: `cloudach up --replicas 2` with PostgreSQL and
Redis runs two of every process (two Tritons, edges on two ports). Both edges are driven while one
Triton and one inference_svc are SIGKILLed: streams they held end (an error, never a hang),
requests started after each kill all succeed on the survivors, a key's limit holds exactly across
the two edges, and the PostgreSQL ledger equals what the clients saw."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import openai
import psycopg
import pytest

from billing_svc.store import COST_PICOS
from tests.e2e.conftest import MODEL, launch_stack
from tests.e2e.test_faults import Seen, _wrong, streams_cut_by

POSTGRES = os.environ.get("CLOUDACH_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")
REDIS = os.environ.get("CLOUDACH_TEST_REDIS", "redis://127.0.0.1:6379/0")
SCHEMA = f"replicas_{uuid.uuid4().hex[:10]}"
DATABASE = f"{POSTGRES}?options=-csearch_path%3D{SCHEMA}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
    try:
        yield from launch_stack(tmp_path_factory, {
            "CLOUDACH_BILLING_RECONCILE_AFTER_S": "1", "CLOUDACH_BILLING_RECONCILE_EVERY_S": "0.5",
            "CLOUDACH_EDGE_OUTBOX_MAX_BACKOFF_S": "1", "CLOUDACH_INFERENCE_OUTBOX_MAX_BACKOFF_S": "1",
        }, ("--replicas", "2", "--database", DATABASE, "--redis", REDIS))
    finally:
        with psycopg.connect(POSTGRES, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {SCHEMA} CASCADE")


def _edges(stack) -> list[str]:
    return [f"http://127.0.0.1:{stack.port + i}/v1" for i in range(2)]


def _client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)


async def _short(url: str, key: str) -> tuple[str, object] | int:
    """One small non-streamed request: (its id, its usage), or the HTTP status that refused it."""
    client = _client(url, key)
    try:
        reply = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=2)
        return reply.id, reply.usage
    except openai.APIStatusError as error:
        return error.status_code
    finally:
        await client.close()


async def _kill_under_load(stack, key: str, victim: str) -> tuple[list[Seen], list]:
    """Streams on both edges; victim SIGKILLed once they have tokens; then, on both edges,
    requests started after the kill."""
    # Shorter answers than the faults suite's: two Tritons share these two cores, so each is slower.
    seen = await streams_cut_by(stack, [_client(url, key) for url in _edges(stack)], victim, max_tokens=40,
                                end_within_s=120)
    after = await asyncio.gather(*(_short(url, key) for url in _edges(stack) * 3))
    return seen, after


def _ledger() -> dict[str, tuple]:
    with psycopg.connect(DATABASE) as conn:
        rows = conn.execute("SELECT request_id, prompt_tokens, completion_tokens, outcome, source, "
                            f"{COST_PICOS} FROM usage_records").fetchall()
    return {row[0]: row[1:] for row in rows}


# The whole stack starts in this test's module fixture, then rounds of kills and restarts: longer
# than the suite's 120 s per test, bounded all the same.
@pytest.mark.timeout(300)
def test_two_of_everything_share_limits_survive_a_dead_triton_and_inference_svc_and_bill_once(stack):
    assert {"edge-1", "edge-2", "tritonserver-1", "tritonserver-2", "inference_svc-2", "auth_svc-2",
            "billing_svc-2"} <= set(stack.services())
    # One key's limit, exact across both edges (shared through Redis): 10 of 16 alternating requests.
    limited = stack.create_key("replicas-limited", "--rpm", "10")
    answers = [asyncio.run(_short(_edges(stack)[i % 2], limited)) for i in range(16)]
    assert sorted(a if isinstance(a, int) else 200 for a in answers) == [200] * 10 + [429] * 6, answers
    key = stack.create_key("replicas")
    rounds = {}
    for victim in ("tritonserver-1", "inference_svc-1"):
        at = len(stack.output.text)
        rounds[victim] = asyncio.run(_kill_under_load(stack, key, victim))
        # Requests that started after the kill went to the survivors.
        assert all(not isinstance(a, int) for a in rounds[victim][1]), rounds[victim][1]
        stack.output.wait_for(f"{victim} ready again", 180, start=at)
    for victim, (seen, _) in rounds.items():
        assert any(not s.done for s in seen), f"killing {victim} cut no stream: the test proved nothing"
    # The ledger: every request once, as its client saw it.
    expected = [a for a in answers if not isinstance(a, int)] + [a for _, after in rounds.values() for a in after]
    streams = [s for seen, _ in rounds.values() for s in seen]
    deadline = time.monotonic() + 60
    while True:
        ledger = _ledger()
        wrong = {s.id: why for s in streams if (why := _wrong(s, ledger.get(s.id)))}
        wrong.update({rid: ledger.get(rid) for rid, usage in expected
                      if (ledger.get(rid) or (None,))[:4] != (usage.prompt_tokens, usage.completion_tokens,
                                                                "completed", "edge")})
        if not wrong:
            break
        assert time.monotonic() < deadline, wrong
        time.sleep(0.5)
    assert len(ledger) >= len(expected) + len(streams)
