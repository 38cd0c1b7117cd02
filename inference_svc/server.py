"""inference_svc's composition root: configuration -> registry, engine, servicer, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from cloudach.auth.v1.auth_pb2_grpc import AuthServiceStub
from cloudach.billing.v1.billing_pb2_grpc import BillingServiceStub
from cloudach.inference.v1 import inference_pb2, inference_pb2_grpc
from cloudach.metrics import RpcObservability
from cloudach.outbox import ServiceToken, delivering
from cloudach.rpc.auth import TokenInterceptor, auth_jwks_fetcher
from cloudach.rpc.client import service_channel
from cloudach.telemetry import client_interceptors
from cloudach.rpc.server import GrpcServer, RunningService, start_grpc_server, run_service
from cloudach.tokens import INFERENCE_AUDIENCE, TokenVerifier
from inference_svc.config import InferenceConfig
from inference_svc.engine import Engine
from inference_svc.registry import ModelRegistry, load_registry
from inference_svc.reports import Report, outbox_report
from inference_svc.service import InferenceMetrics, InferenceService
from inference_svc.triton_engine import TritonEngine

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
GENERATE_MANY = f"/{SERVICE_NAME}/GenerateMany"


@dataclass
class RunningInference(RunningService):
    service: InferenceService


async def _watch_health(server: GrpcServer, registry: ModelRegistry, engine: Engine, every_s: float) -> None:
    """SERVING while at least one model is ready in Triton, NOT_SERVING otherwise."""
    serving = None
    while True:
        ready = any(await asyncio.gather(*(engine.model_ready(s.id) for s in registry)))
        if ready != serving:
            log.info("inference_svc %s", "serving" if ready else "not serving: no model ready in Triton")
            await server.set_serving(ready)
            serving = ready
        await asyncio.sleep(every_s)


async def _reporting(stack: contextlib.AsyncExitStack, config: InferenceConfig, auth_channel,
                     measures: InferenceMetrics) -> Report:
    """Generation reports through a durable outbox delivered to billing_svc, for the stack's life."""
    billing = await stack.enter_async_context(service_channel(config.billing_target, client_interceptors()))
    identity = None
    if config.service_key_file:
        identity = ServiceToken(AuthServiceStub(auth_channel), pathlib.Path(config.service_key_file).read_text().strip())
    outbox, wake = await stack.enter_async_context(delivering(
        config.outbox_path, BillingServiceStub(billing), identity, config.outbox_max_backoff_s, 5.0,
        measures.outbox_depth, measures.outbox_set_aside, config.outbox_flush_s))
    return outbox_report(outbox, wake)


@contextlib.asynccontextmanager
async def running_inference(
    config: InferenceConfig,
    engine: Engine | None = None,
    registry: ModelRegistry | None = None,
    verifier: TokenVerifier | None = None,
) -> AsyncIterator[RunningInference]:
    """Serves inference_svc for the duration of the block, then drains and closes everything.

    Every call needs an internal token; verifier defaults to one reading auth_svc's keys."""
    registry = registry or load_registry(config.models_file)
    engine = engine or TritonEngine(config.triton_urls, config.token_timeout_s, {s.id: s.engine for s in registry})
    async with contextlib.AsyncExitStack() as stack:
        auth_channel = await stack.enter_async_context(service_channel(config.auth_target, client_interceptors()))
        if verifier is None:
            verifier = TokenVerifier(auth_jwks_fetcher(auth_channel))
        metrics = CollectorRegistry()
        measures = InferenceMetrics(metrics)
        report = None
        if config.billing_target:
            report = await _reporting(stack, config, auth_channel, measures)
        observability = RpcObservability("inference", metrics)
        service = InferenceService(registry, engine, config, measures, report, verifier, observability.observing)
        server = await start_grpc_server(
            config.listen_address,
            lambda s: inference_pb2_grpc.add_InferenceServiceServicer_to_server(service, s),
            [SERVICE_NAME],
            metrics=("inference", metrics, None if config.metrics_port < 0 else config.metrics_port),
            observability=observability,
            # GenerateMany carries calls that each bring a token, checked one by one (inference_svc.mux).
            interceptors=[TokenInterceptor(verifier, INFERENCE_AUDIENCE, open_methods=[GENERATE_MANY])],
            serving=False,  # until _watch_health has seen a model ready in Triton
        )
        watcher = asyncio.create_task(_watch_health(server, registry, engine, config.health_poll_s))
        try:
            yield RunningInference(server, service)
        finally:
            watcher.cancel()
            service.draining = True  # shared streams take no new calls: the edge sends them elsewhere
            await server.stop(config.shutdown_grace_s)
            await service.reports_written()  # the generations stop cut are reported before the outbox closes
            await engine.close()


def main() -> None:
    run_service("inference_svc", lambda: running_inference(InferenceConfig.from_env()))
