"""One API request, one trace: spans from every hop with the right parents and attributes."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest

from auth_svc.store import Limits
from inference_svc.server import running_inference
from tests.conftest import MODEL, SPANS, inference_config, running_edge

pytestmark = pytest.mark.triton
PROMPT = "Tell me about lighthouses, secret-prompt-marker."
TRACE_ID = uuid.uuid4().hex
CALLER = f"00-{TRACE_ID}-{uuid.uuid4().hex[:16]}-01"


def attributes_text(spans) -> str:
    return repr([(s.name, dict(s.attributes or {}), [(e.name, dict(e.attributes or {})) for e in s.events]) for s in spans])


async def test_one_request_is_one_trace_across_every_service(triton, registry, auth, billing):
    key = (await auth.store.create(f"o-{uuid.uuid4().hex[:6]}", "t", Limits()))[1]
    config = inference_config(auth, triton_urls=(triton.grpc_url,))
    async with running_inference(config, registry=registry) as inf:
        async with running_edge(inf.address, auth.address, billing_target=billing.address) as url:
            SPANS.clear()
            async with aiohttp.ClientSession() as session:
                body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5, "stream": True}
                async with session.post(f"{url}/v1/chat/completions", json=body,
                                        headers={"Authorization": f"Bearer {key}", "traceparent": CALLER}) as r:
                    assert r.status == 200
                    await r.read()
            async with asyncio.timeout(10):  # the usage delivery is asynchronous
                while not any(s.name.endswith("BillingService/RecordUsage") for s in SPANS.get_finished_spans()):
                    await asyncio.sleep(0.1)
    spans = [s for s in SPANS.get_finished_spans() if s.context.trace_id == int(TRACE_ID, 16)]
    by_name = {s.name: s for s in spans}
    edge = by_name["POST /v1/chat/completions"]
    assert edge.parent.span_id == int(CALLER.split("-")[2], 16)  # joined the caller's trace
    names = set(by_name)
    assert {"/cloudach.auth.v1.AuthService/Authenticate", "/cloudach.inference.v1.InferenceService/Generate",
            "triton ModelStreamInfer", "/cloudach.billing.v1.BillingService/RecordUsage", "usage delivery"} <= names

    def parent_of(span):
        return next(s for s in spans if s.context.span_id == span.parent.span_id)

    def server(name):
        return next(s for s in spans if s.name == name and s.kind.name == "SERVER")

    generate = server("/cloudach.inference.v1.InferenceService/Generate")
    assert parent_of(parent_of(generate)) is edge  # edge -> client span -> inference_svc's server span
    assert parent_of(by_name["triton ModelStreamInfer"]) is generate
    assert parent_of(parent_of(server("/cloudach.auth.v1.AuthService/Authenticate"))) is edge
    record = server("/cloudach.billing.v1.BillingService/RecordUsage")
    assert parent_of(parent_of(parent_of(record))) is edge  # edge -> delivery -> client -> billing

    a = edge.attributes
    assert a["gen_ai.request.model"] == MODEL and a["gen_ai.request.max_tokens"] == 5
    assert a["gen_ai.usage.output_tokens"] == 5 and a["gen_ai.usage.input_tokens"] > 0
    assert a["gen_ai.response.finish_reasons"] == ("length",) and a["http.response.status_code"] == 200
    assert a["cloudach.outcome"] == "completed"
    assert [e.name for e in edge.events] == ["gen_ai.first_token"]
    assert generate.attributes["gen_ai.usage.output_tokens"] == 5
    assert "gen_ai.first_token" in [e.name for e in generate.events]
    text = attributes_text(spans)
    assert key not in text and key[3:15] not in text and "secret-prompt-marker" not in text and "lighthouses" not in text
