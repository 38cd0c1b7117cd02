"""The real services in this process, on free loopback ports, for the integration tests: their
settings, starters and helpers. The fixtures built from them are in conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from auth_svc.config import AuthConfig
from bench.drivers import model_inputs, model_responses
from billing_svc.config import BillingConfig
from cloudach.rpc.auth import bearer_interceptors
from cloudach.tokens import BILLING_AUDIENCE, INFERENCE, INFERENCE_AUDIENCE, USAGE_WRITE
from edge.app import create_app
from edge.config import EdgeConfig
from inference_svc.config import InferenceConfig
from inference_svc.server import running_inference
from tests.conftest import MODEL
from tools.launcher.triton import TritonServer, start_triton_ready

#: Every service in these tests runs in this process: one tracer provider records all their spans.
SPANS = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(_provider)

#: imported into the session's auth_svc as its bootstrap admin key
API_KEY = "ck-test-0123456789abcdefghijklmnopqrstuvwxyzABCDEF"
#: imported as a service key: the edge's identity towards billing_svc
SERVICE_KEY = "ck-service-0123456789abcdefghijklmnopqrstuvwxyzABCDEF"
__all__ = ["API_KEY", "MODEL", "SERVICE_KEY", "SPANS"]


def auth_config(tmp: pathlib.Path, **overrides) -> AuthConfig:
    key_file = tmp / "admin-key"
    if not key_file.exists():
        key_file.write_text(API_KEY + "\n")
    settings = dict(
        listen_address="127.0.0.1:0", metrics_port=0, database_url=f"sqlite:///{tmp / 'auth.db'}",
        signing_key_file=str(tmp / "signing-key.pem"), bootstrap_admin_key_file=str(key_file),
        bootstrap_service_key_files=(str(service_key_file()),),
    )
    return AuthConfig(**{**settings, **overrides})


def billing_config(tmp: pathlib.Path, auth, **overrides) -> BillingConfig:
    settings = dict(listen_address="127.0.0.1:0", metrics_port=0, database_url=f"sqlite:///{tmp / 'billing.db'}",
                    auth_target=auth.address)
    return BillingConfig(**{**settings, **overrides})


def inference_config(auth, **overrides) -> InferenceConfig:
    return dataclasses.replace(
        InferenceConfig(), listen_address="127.0.0.1:0", metrics_port=0, health_poll_s=0.2, auth_target=auth.address,
        **overrides
    )


@functools.cache
def service_key_file() -> pathlib.Path:
    """The edge's own key for billing deliveries (a service key, as in the local stack)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="cloudach-test-")) / "service-key"
    path.write_text(SERVICE_KEY + "\n")
    return path


def batch_places(directory: pathlib.Path) -> dict[str, str]:
    """An edge's batch database and files directory (edges given the same share batch jobs)."""
    return {"batch_database_url": f"sqlite:///{directory / 'batches.db'}", "files_dir": str(directory / "files")}


def edge_config(inference_address: str, auth_address: str, **overrides) -> EdgeConfig:
    settings = dict(
        inference_target=inference_address, auth_target=auth_address, billing_target="127.0.0.1:1",
        outbox_path=str(pathlib.Path(tempfile.mkdtemp(prefix="cloudach-outbox-")) / "outbox.db"),
        **batch_places(pathlib.Path(tempfile.mkdtemp(prefix="cloudach-batches-"))),
        service_key_file=str(service_key_file()), outbox_max_backoff_s=0.5, metrics_port=-1, outbox_flush_s=0,
    )
    return EdgeConfig(**{**settings, **overrides})


def signed(auth, audience: str, *scopes: str, org: str = "test") -> str:
    """A token auth_svc signed for audience with scopes."""
    return auth.signer.sign("key_test_service", {"org": org}, audience, scopes)[0]


def service_token(auth, *extra_scopes: str) -> str:
    """A service identity's token for billing_svc: it may record usage (and what extra_scopes add)."""
    return signed(auth, BILLING_AUDIENCE, USAGE_WRITE, *extra_scopes)


def authed_channel(address: str, auth) -> grpc.aio.Channel:
    """A channel to inference_svc whose every call carries a valid inference token."""
    return grpc.aio.insecure_channel(address, interceptors=bearer_interceptors(signed(auth, INFERENCE_AUDIENCE, INFERENCE)))


def launch_triton(tmp_path_factory) -> TritonServer:
    log = pathlib.Path(tmp_path_factory.mktemp("triton")) / "tritonserver.log"
    return start_triton_ready(log, ["tensorrt_llm"], timeout_s=120)


#: What tritonserver's own handler prints for a fatal signal (15 is a clean stop).
_CRASHED = re.compile(r"^Signal \((?!15\))\d+\) received\.", re.MULTILINE)


@dataclasses.dataclass
class TritonWatch:
    """The session's Triton, with what its log said since a mark. tritonserver 2.51 now and then
    crashes under load in its own gRPC stream handler (README: the model), and after a SIGABRT it
    can hang in its signal handler, still holding its ports."""

    server: TritonServer
    mark: int = 0

    def begin(self) -> None:
        self.mark = self.server.log_path.stat().st_size if self.server.log_path.exists() else 0

    def crashed(self) -> str | None:
        """The crash since begin(), if any: the process gone, or its fatal-signal line."""
        if not self.server.is_running():
            return f"tritonserver exited ({self.server.process.returncode})"
        with open(self.server.log_path, "rb") as log:
            log.seek(self.mark)
            found = _CRASHED.search(log.read().decode(errors="replace"))
        return found and found.group(0)

    def revive(self) -> str | None:
        """Restarts a crashed Triton on its own ports (in place: every fixture keeps its address);
        waits out inference_svc's reconnect backoff (at most 5 s). Returns what crashed, or None."""
        crash = self.crashed()
        if crash is None:
            return None
        self.server.kill()
        fresh = start_triton_ready(self.server.log_path.with_name(f"revived-{self.server.process.pid}.log"),
                                   ["tensorrt_llm"], timeout_s=120,
                                   ports=(self.server.http_port, self.server.grpc_port, self.server.metrics_port))
        self.server.process, self.server.log_path = fresh.process, fresh.log_path
        self.mark = 0
        time.sleep(6)
        return crash


def model_metrics(server: TritonServer) -> dict[str, float]:
    """The stand-in model's own counters, read from Triton's metrics port."""
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    found = {}
    for line in text.splitlines():
        match = re.match(r"^(cloudach_model_\w+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if match:
            outcome = re.search(r'outcome="(\w+)"', match.group(2) or "")
            key = match.group(1) + (f":{outcome.group(1)}" if outcome else "")
            found[key] = float(match.group(3))
    return found


@contextlib.asynccontextmanager
async def running_edge(inference_address: str, auth_address: str, **overrides):
    """The edge app on a free loopback port, as `python -m edge` runs it; yields its base URL."""
    config = edge_config(inference_address, auth_address, **overrides)
    runner = web.AppRunner(create_app(config), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def edge_over_fake(engine, registry, auth, **edge_overrides):
    """The edge in front of the real auth_svc and an inference_svc whose engine is the fake one."""
    async with running_inference(inference_config(auth), engine=engine, registry=registry) as inf:
        async with running_edge(inf.address, auth.address, **edge_overrides) as url:
            yield url


def run_cli(*args: str, api_key: str = API_KEY) -> subprocess.CompletedProcess:
    """The `cloudach` command in its own process, as a user runs it. (In this process it would
    start a second event loop, and grpc.aio serves one event loop per process.)"""
    return subprocess.run([sys.executable, "-m", "tools", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CLOUDACH_API_KEY": api_key})


# -- our tensorrt_llm model, called directly ---------------------------------------------------

@dataclasses.dataclass
class ModelStream:
    """What one streamed request to the model gave: per sequence, its ids and log probs."""

    sequences: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    log_probs: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    top_log_probs: dict[int, list[tuple[list[int], list[float]]]] = dataclasses.field(default_factory=dict)
    first_token_at: float | None = None
    ended_at: float = 0.0
    error: str | None = None

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.sequences.values())


async def stream_model(url: str, input_ids: list[int], request_id: str, cancel_after: int | None = None,
                       **inputs) -> ModelStream:
    """One streaming request to the `tensorrt_llm` model, its scalar inputs given by name."""
    import tritonclient.grpc.aio as triton

    tensors = model_inputs(input_ids, streaming=True, **inputs)
    result = ModelStream()
    async with triton.InferenceServerClient(url) as client, \
            contextlib.aclosing(model_responses(client, tensors, request_id)) as responses:
        async for response, error in responses:
            if error is not None:
                result.error = error.message()
                break
            out = response.as_numpy("output_ids")
            index = int(response.as_numpy("sequence_index").reshape(-1)[0]) if out is not None else 0
            new = [] if out is None else out.reshape(-1).tolist()
            if new and result.first_token_at is None:
                result.first_token_at = time.monotonic()
            result.sequences.setdefault(index, []).extend(new)
            log_probs = response.as_numpy("output_log_probs")
            if log_probs is not None:
                result.log_probs.setdefault(index, []).extend(log_probs.reshape(-1).tolist())
            top_ids, top_lps = response.as_numpy("top_log_prob_ids"), response.as_numpy("top_log_probs")
            if top_ids is not None:
                steps = top_ids.reshape(-1, top_ids.shape[-1]).tolist(), top_lps.reshape(-1, top_lps.shape[-1]).tolist()
                result.top_log_probs.setdefault(index, []).extend(zip(*steps))
            if cancel_after is not None and result.tokens >= cancel_after:
                break  # leaving the stream cancels the request
    result.ended_at = time.monotonic()
    return result


async def model_idle(server: TritonServer, timeout_s: float = 10.0) -> None:
    """Waits until the model runs no request (one cancelled just before may still be ending): a
    request decoded alone gives the same tokens every time, one batched with others may not."""
    async with asyncio.timeout(timeout_s):
        while (await asyncio.to_thread(model_metrics, server)).get("cloudach_model_active_requests", 0) > 0:
            await asyncio.sleep(0.02)


async def model_cancelled(server: TritonServer, before: dict[str, float], count: int = 1,
                          timeout_s: float = 20.0) -> dict[str, float]:
    """The model's counters once count more requests than in before have ended cancelled and none
    runs: what the model really did for a caller that went away, however loaded the machine is.
    Times out (failing the test) if the cancel never reaches the model."""
    want = before.get("cloudach_model_requests_total:cancelled", 0) + count
    async with asyncio.timeout(timeout_s):
        while True:
            now = await asyncio.to_thread(model_metrics, server)
            if now.get("cloudach_model_requests_total:cancelled", 0) >= want and \
                    now.get("cloudach_model_active_requests", 0) == 0:
                return now
            await asyncio.sleep(0.05)


def samples(text: str) -> dict[tuple, float]:
    """A Prometheus text exposition as {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
