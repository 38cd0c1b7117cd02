"""Shared fixtures: the real Triton server with the CPU model, and inference_svc in front of it."""

from __future__ import annotations

import dataclasses
import pathlib
import re
import urllib.request

import grpc
import pytest

from cloudach.inference.v1 import inference_pb2_grpc
from cloudach.launcher.triton import TritonServer, start_triton
from inference_svc.config import InferenceConfig
from inference_svc.registry import ModelRegistry, load_registry
from inference_svc.server import running_inference

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def registry() -> ModelRegistry:
    return load_registry(InferenceConfig().models_file)


def launch_triton(tmp_path_factory) -> TritonServer:
    log = pathlib.Path(tmp_path_factory.mktemp("triton")) / "tritonserver.log"
    server = start_triton(log)
    try:
        server.wait_ready(["tensorrt_llm"], timeout_s=120)
    except Exception:
        server.kill()
        raise
    return server


@pytest.fixture(scope="session")
def triton(tmp_path_factory):
    server = launch_triton(tmp_path_factory)
    yield server
    server.stop()


def inference_config(**overrides) -> InferenceConfig:
    return dataclasses.replace(InferenceConfig(), listen_address="127.0.0.1:0", health_poll_s=0.2, **overrides)


@pytest.fixture(scope="session")
async def inference(triton, registry):
    """inference_svc on a free loopback port, streaming from the session's Triton."""
    async with running_inference(inference_config(triton_urls=(triton.grpc_url,)), registry=registry) as running:
        yield running


@pytest.fixture(scope="session")
async def stub(inference):
    async with grpc.aio.insecure_channel(inference.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


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


# -- the edge ---------------------------------------------------------------------------------

API_KEY = "ck-test-0123456789abcdefghijklmnopqrstuvwxyzABCDEF"

import contextlib  # noqa: E402

from aiohttp import web  # noqa: E402

from edge.app import create_app  # noqa: E402
from edge.config import EdgeConfig, key_digest  # noqa: E402


@contextlib.asynccontextmanager
async def running_edge(inference_address: str, **overrides):
    """The edge app on a free loopback port, as `python -m edge` runs it; yields its base URL."""
    config = EdgeConfig(inference_target=inference_address, api_key_digests=frozenset({key_digest(API_KEY)}), **overrides)
    runner = web.AppRunner(create_app(config), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture(scope="session")
async def edge_url(inference):
    """The edge in front of the real inference_svc and Triton."""
    async with running_edge(inference.address) as url:
        yield url


@contextlib.asynccontextmanager
async def edge_over_fake(engine, registry, **edge_overrides):
    """The edge in front of a real inference_svc whose engine is the fake one."""
    async with running_inference(inference_config(), engine=engine, registry=registry) as inf:
        async with running_edge(inf.address, **edge_overrides) as url:
            yield url
