"""Session fixtures: real auth_svc and billing_svc (SQLite), the real Triton server with the CPU
model, inference_svc in front of it, and the edge in front of them all."""

from __future__ import annotations

import os
import uuid

import psycopg
import pytest

from auth_svc.server import running_auth
from billing_svc.server import running_billing
from cloudach.db import Database
from cloudach.inference.v1 import inference_pb2_grpc
from inference_svc.server import running_inference
from tests.integration.services import (TritonWatch, auth_config, authed_channel, billing_config, inference_config,
                                        launch_triton, running_edge)

POSTGRES = os.environ.get("CLOUDACH_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", "postgresql"])
async def database(request, tmp_path):
    """A fresh database of each kind. PostgreSQL must be there: a missing server fails, never skips."""
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'test.db'}")
        yield db
        await db.close()
        return
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    db = Database(f"{POSTGRES}?options=-csearch_path%3D{schema}")
    try:
        yield db
    finally:
        await db.close()
        with psycopg.connect(POSTGRES, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="session")
async def auth(tmp_path_factory):
    """A real auth_svc (SQLite), whose bootstrap admin key is API_KEY."""
    async with running_auth(auth_config(tmp_path_factory.mktemp("auth"))) as running:
        yield running


@pytest.fixture(scope="session")
async def billing(tmp_path_factory, auth):
    """A real billing_svc (SQLite) trusting the session's auth_svc."""
    async with running_billing(billing_config(tmp_path_factory.mktemp("billing"), auth)) as running:
        yield running


#: the session Triton's watch, once it runs (read by the rerun condition below)
_watch: TritonWatch | None = None


@pytest.fixture(scope="session")
def triton(tmp_path_factory):
    global _watch
    server = launch_triton(tmp_path_factory)
    _watch = TritonWatch(server)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _triton_alive(request):
    """A test on the session Triton starts on a live one: one that crashed since the last test
    (tritonserver 2.51's own crash, README: the model) is restarted on its ports, and says so."""
    if "triton" in request.fixturenames:
        request.getfixturevalue("triton")
        crash = _watch.revive()
        if crash:
            print(f"\n!! the session's tritonserver had crashed ({crash}); restarted on its ports")
        _watch.begin()
    yield


def _triton_crashed_under_it(error) -> bool:
    return _watch is not None and _watch.crashed() is not None


def pytest_collection_modifyitems(items):
    """A test on the session Triton that failed while that Triton crashed runs once more, on a
    restarted one (pytest reports it as rerun). Any other failure stands."""
    for item in items:
        if "triton" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.flaky(reruns=1, condition=_triton_crashed_under_it))


@pytest.fixture(scope="session")
async def inference(triton, registry, auth):
    """inference_svc on a free loopback port, streaming from the session's Triton."""
    async with running_inference(inference_config(auth, triton_urls=(triton.grpc_url,)), registry=registry) as running:
        yield running


@pytest.fixture(scope="session")
async def stub(inference, auth):
    async with authed_channel(inference.address, auth) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="session")
async def edge_url(inference, auth):
    """The edge in front of the real auth_svc, inference_svc and Triton."""
    async with running_edge(inference.address, auth.address) as url:
        yield url
