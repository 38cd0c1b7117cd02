"""One API request, one trace: spans from every hop with the right parents and attributes."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest

from auth_svc.store import Limits
from inference_svc.server import running_inference
from tests.integration.services import MODEL, SPANS, inference_config, running_edge, samples
from tools.launcher.ports import free_ports

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
    assert len({s.context.trace_id for s in spans}) == 1

    def parent_of(span):
        return next(s for s in spans if s.context.span_id == span.parent.span_id)

    def server(name):
        return next(s for s in spans if s.name == name and s.kind.name == "SERVER")

    generate = server("/cloudach.inference.v1.InferenceService/Generate")
    assert parent_of(generate) is edge
    assert parent_of(by_name["triton ModelStreamInfer"]) is generate
    assert parent_of(server("/cloudach.auth.v1.AuthService/Authenticate")) is edge
    record = server("/cloudach.billing.v1.BillingService/RecordUsage")
    assert parent_of(parent_of(record)) is edge  # edge -> the later usage delivery -> billing_svc

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


async def scrape(session, url) -> dict[tuple, float]:
    async with session.get(url) as r:
        assert r.status == 200
        return samples(await r.text())


def value(metrics, name, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_move_by_exactly_what_the_requests_did(registry, auth, billing):
    from tests.fakes import FakeEngine

    key = (await auth.store.create(f"o-{uuid.uuid4().hex[:6]}", "t", Limits()))[1]
    engine = FakeEngine(steps=[registry.get(MODEL).tokenizer.encode(" ok")] * 4)
    async with running_inference(inference_config(auth), engine=engine, registry=registry) as inf:
        (metrics_port,) = free_ports(1)
        async with running_edge(inf.address, auth.address, billing_target=billing.address, metrics_port=metrics_port) as url:
            inference_metrics = f"http://127.0.0.1:{inf.grpc.metrics_port}/metrics"
            edge_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{url}/metrics") as r:
                    assert r.status == 404  # not on the public API's port
                edge_before, inf_before = await scrape(session, edge_metrics), await scrape(session, inference_metrics)
                usage = 0
                for stream in (True, False):
                    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": stream}
                    async with session.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 10},
                                            headers={"Authorization": f"Bearer {key}"}) as r:
                        assert r.status == 200
                        raw = await r.read()
                    usage += sum(len(s) for s in engine.steps)
                async with session.post(f"{url}/v1/chat/completions", json={"model": MODEL},
                                        headers={"Authorization": f"Bearer {key}"}) as r:
                    assert r.status == 400
                for made_up in ("gpt-9", "gpt-10"):
                    async with session.post(f"{url}/v1/chat/completions", json={**body, "model": made_up},
                                            headers={"Authorization": f"Bearer {key}"}) as r:
                        assert r.status == 404
                async with session.post(f"{url}/v1/chat/completions", json={}) as r:
                    assert r.status == 401
                await asyncio.sleep(0.2)
                edge, inference = await scrape(session, edge_metrics), await scrape(session, inference_metrics)
    route = "/v1/chat/completions"

    def moved(metrics, before, name, **labels):
        return value(metrics, name, **labels) - value(before, name, **labels)

    assert moved(edge, edge_before, "cloudach_edge_requests_total", route=route, status="200", model=MODEL) == 2
    assert moved(edge, edge_before, "cloudach_edge_requests_total", route=route, status="400", model="unknown") == 1
    # made-up model names make no series of their own
    assert moved(edge, edge_before, "cloudach_edge_requests_total", route=route, status="404", model="unknown") == 2
    assert not [labels for name, labels in edge if "gpt-9" in str(labels)]
    assert moved(edge, edge_before, "cloudach_edge_requests_total", route=route, status="401", model="") == 1
    assert moved(edge, edge_before, "cloudach_edge_output_tokens_total", model=MODEL) == usage
    assert moved(edge, edge_before, "cloudach_edge_time_to_first_token_seconds_count", model=MODEL) == 2
    assert moved(edge, edge_before, "cloudach_edge_inter_token_latency_seconds_count", model=MODEL) == 3  # 4 deltas streamed
    assert value(edge, "cloudach_edge_active_streams") == 0
    assert ("cloudach_edge_billing_outbox_depth", ()) in edge
    assert moved(edge, edge_before, "cloudach_edge_auth_cache_total", result="miss") >= 1
    assert moved(edge, edge_before, "cloudach_edge_auth_cache_total", result="hit") >= 2
    assert moved(inference, inf_before, "cloudach_inference_rpc_requests_total", method="Generate", code="OK") == 2
    assert moved(inference, inf_before, "cloudach_inference_output_tokens_total", model=MODEL) == usage
    assert value(inference, "cloudach_inference_active_streams") == 0
