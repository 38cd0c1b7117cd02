"""Bad input never gets a 500: seeded random mutations of a valid request, through the real stack
(edge and inference_svc over gRPC, the fake engine behind them)."""

from __future__ import annotations

import json
import random

import aiohttp

from tests.integration.services import API_KEY, MODEL, edge_over_fake
from tests.fakes import FakeEngine

VALID = {
    "model": MODEL,
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 1, "stop": ["\n"], "presence_penalty": 0,
    "frequency_penalty": 0, "n": 1, "stream": False, "user": "u",
}
ODD_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**64, 10**30, -(10**30), 1e308, -1e-308, 0.5, "", "x",
              "\u0000", "😀" * 3, "<|im_end|>", [], [None], [{}], {}, {"a": [1, {"b": None}]}, [[[[[]]]]]]


def mutate(rng: random.Random, body: dict) -> dict:
    body = json.loads(json.dumps(body))
    for _ in range(rng.randint(1, 3)):
        target = body
        path = rng.choice([["model"], ["messages"], ["messages", 1], ["messages", 1, "content"],
                           ["messages", 0, "role"], ["messages", 1, "content", 0, "text"], ["stop"],
                           ["stream_options"], ["tools"], ["n"], ["max_tokens"], ["max_completion_tokens"],
                           ["temperature"], ["seed"], ["top_p"], ["logprobs"], [rng.choice(["x", "é", "model "])]])
        try:
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = rng.choice(ODD_VALUES)
        except (KeyError, IndexError, TypeError):
            continue
    return body


async def test_no_mutation_of_a_valid_request_gets_a_500(registry, auth):
    rng = random.Random(20261124)
    tok = registry.get(MODEL).tokenizer
    engine = FakeEngine(steps=[tok.encode("ok")])
    seen = set()
    async with edge_over_fake(engine, registry, auth) as url:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
            for _ in range(300):
                body = mutate(rng, VALID)
                async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                    raw = await r.read()
                    seen.add(r.status)
                    assert r.status < 500, (r.status, body, raw)
                    if r.status >= 400:
                        assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}, raw
    assert {200, 400} <= seen
