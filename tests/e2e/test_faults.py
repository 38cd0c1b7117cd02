"""Faults on the real stack: with streams running, billing_svc, inference_svc, Triton and the edge
are SIGKILLed in turn. No stream may hang; afterwards the ledger holds every stream once: one that
got [DONE] with the usage it reported, one that was cut with at least the tokens its client
received and at most what the model could generate, priced at zero (our crash cut it). Every
concurrency slot is released (each round's streams all fit the key's limit again) and the
launcher restarted each process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from dataclasses import dataclass

import openai
import pytest

from cloudach import defaults as d
from billing_svc.store import COST_PICOS
from tests.e2e.conftest import MODEL, launch_stack

STREAMS = 6
MAX_TOKENS = 120
PROMPT = "Count from 1 to 200, one number per line."  # greedy (temperature 0): a long answer, every time
#: killed in this order: the edge last, as its restart also forgets its in-process limits (which
#: would hide a slot leaked in an earlier round)
VICTIMS = ("billing_svc", "inference_svc", "tritonserver", "edge")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    yield from launch_stack(tmp_path_factory, {
        # Requests only inference_svc reported are reconciled after a second, not a minute, and
        # the outboxes retry at least every second while billing_svc is down.
        "CLOUDACH_BILLING_RECONCILE_AFTER_S": "1", "CLOUDACH_BILLING_RECONCILE_EVERY_S": "0.5",
        "CLOUDACH_EDGE_OUTBOX_MAX_BACKOFF_S": "1", "CLOUDACH_INFERENCE_OUTBOX_MAX_BACKOFF_S": "1",
    })


@dataclass
class Seen:
    """One stream as its client saw it."""

    id: str = ""
    received: int = 0  # tokens, counted by their log-prob entries
    usage: object = None
    done: bool = False
    error: str = ""


async def _stream(client: openai.AsyncOpenAI, seen: Seen, max_tokens: int = MAX_TOKENS) -> None:
    try:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens, stream=True, temperature=0,
            logprobs=True, stream_options={"include_usage": True})
        async for chunk in stream:
            seen.id = chunk.id
            if chunk.usage is not None:
                seen.usage = chunk.usage
            for choice in chunk.choices:
                if choice.logprobs and choice.logprobs.content:
                    seen.received += len(choice.logprobs.content)
        seen.done = seen.usage is not None
    except Exception as error:  # noqa: BLE001 - a cut stream: the edge's error event, or a dropped connection
        seen.error = f"{type(error).__name__}: {error}"


async def streams_cut_by(stack, clients: list[openai.AsyncOpenAI], victim: str, count: int = STREAMS,
                         max_tokens: int = MAX_TOKENS, end_within_s: float = 60) -> list[Seen]:
    """count streams, spread over clients; once each has tokens (or has ended), the victim is
    SIGKILLed; every stream must then end within end_within_s."""
    seen = [Seen() for _ in range(count)]
    tasks = [asyncio.create_task(_stream(clients[i % len(clients)], s, max_tokens)) for i, s in enumerate(seen)]
    deadline = time.monotonic() + 120
    while not all(s.received >= 3 or t.done() for s, t in zip(seen, tasks)):
        assert time.monotonic() < deadline, "the streams did not start"
        await asyncio.sleep(0.05)
    os.kill(stack.services()[victim]["pid"], signal.SIGKILL)
    _, hung = await asyncio.wait(tasks, timeout=end_within_s)
    for task in hung:
        task.cancel()
    for client in clients:
        await client.close()
    assert not hung, f"{len(hung)} stream(s) hung after {victim} was killed"
    return seen


async def _round(stack, key: str, victim: str) -> list[Seen]:
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=120)
    seen = await streams_cut_by(stack, [client], victim)
    assert all(s.id for s in seen), [s.error for s in seen]  # each was admitted (no leaked slot refused it)
    return seen


def _ledger(stack) -> dict[str, tuple]:
    rows = stack.ledger(f"request_id, prompt_tokens, completion_tokens, outcome, source, {COST_PICOS}")
    return {row[0]: row[1:] for row in rows}


def _waiting(stack) -> int:
    """Records still in the edge's and inference_svc's outboxes."""
    total = 0
    for name in (d.EDGE_OUTBOX, d.INFERENCE_OUTBOX):
        with contextlib.closing(sqlite3.connect(f"file:{stack.state_dir / 'data' / name}?mode=ro", uri=True)) as db:
            total += db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    return total


def _wrong(seen: Seen, row: tuple | None) -> str:
    """What is wrong with a stream's ledger row ('' when it is right)."""
    if row is None:
        return "not recorded"
    prompt, completion, outcome, source, cost = row
    if seen.done:
        if (prompt, completion, outcome, source) != (seen.usage.prompt_tokens, seen.usage.completion_tokens,
                                                     "completed", "edge") or cost <= 0:
            return f"completed stream recorded as {row}, its usage {seen.usage}"
    elif not (seen.received <= completion <= MAX_TOKENS and outcome in ("failed_mid_stream", "interrupted")
              and cost == 0):
        return f"cut stream ({seen.received} tokens received) recorded as {row}"
    return ""


def _answers_again(stack, key: str, timeout_s: float = 120) -> None:
    """Waits until a request succeeds: a restarted Triton is ready a moment before inference_svc's
    channel to it works again, and the next round must start on a serving stack."""
    client = openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=30)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
            return
        except openai.APIError:
            assert time.monotonic() < deadline, "the stack did not answer again"
            time.sleep(0.5)


# The whole stack starts in this test's module fixture, then rounds of kills and restarts: longer
# than the suite's 120 s per test, bounded all the same.
@pytest.mark.timeout(300)
def test_sigkilled_services_cut_no_bill_and_leak_no_slot(stack):
    key = stack.create_key("faults", "--max-concurrency", str(STREAMS))
    seen: dict[str, list[Seen]] = {}
    for victim in VICTIMS:
        at = len(stack.output.text)
        seen[victim] = asyncio.run(_round(stack, key, victim))
        stack.output.wait_for(f"!! {victim} exited with code -9", 30, start=at)
        stack.output.wait_for(f"{victim} ready again", 180, start=at)
        _answers_again(stack, key)
    # Billing's crash cuts nothing; the others cut what was still streaming.
    assert all(s.done for s in seen["billing_svc"]), [s.error for s in seen["billing_svc"]]
    for victim in VICTIMS[1:]:
        assert any(not s.done for s in seen[victim]), f"killing {victim} cut no stream: the test proved nothing"
    streams = [s for round_ in seen.values() for s in round_]
    assert len({s.id for s in streams}) == len(streams)
    deadline = time.monotonic() + 60
    while True:
        ledger = _ledger(stack)
        wrong = {s.id: why for s in streams if (why := _wrong(s, ledger.get(s.id)))}
        if not wrong and not _waiting(stack):
            break
        assert time.monotonic() < deadline, wrong or f"{_waiting(stack)} record(s) never left the outboxes"
        time.sleep(0.5)
    # A stream the edge's crash cut is known only to inference_svc, whose report recorded it.
    assert any(ledger[s.id][3] == "inference" for s in seen["edge"] if not s.done)
    services = stack.services()
    assert {name: services[name]["restarts"] for name in VICTIMS} == dict.fromkeys(VICTIMS, 1)
    # Every slot is free again: the key's whole concurrency fits once more, and answers.
    final = asyncio.run(_round_without_faults(stack, key))
    assert all(s.done for s in final), [s.error for s in final]


async def _round_without_faults(stack, key: str) -> list[Seen]:
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key=key, max_retries=0, timeout=120)
    seen = [Seen() for _ in range(STREAMS)]
    await asyncio.wait_for(asyncio.gather(*(_stream(client, s) for s in seen)), 120)
    await client.close()
    return seen
