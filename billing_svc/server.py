"""billing_svc's composition root: database, prices, servicer, gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from billing_svc.config import BillingConfig
from cloudach.prices import load_prices
from billing_svc.service import BillingService
from billing_svc.store import UsageStore
from cloudach.billing.v1 import billing_pb2, billing_pb2_grpc
from cloudach.db import Database
from cloudach.rpc.auth import TokenInterceptor, auth_jwks_fetcher
from cloudach.rpc.client import service_channel
from cloudach.telemetry import client_interceptors
from cloudach.rpc.server import RunningService, run_service, start_grpc_server
from cloudach.tokens import BILLING_AUDIENCE, TokenVerifier

log = logging.getLogger(__name__)

SERVICE_NAME = billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name


@dataclass
class RunningBilling(RunningService):
    store: UsageStore


@contextlib.asynccontextmanager
async def running_billing(config: BillingConfig, verifier: TokenVerifier | None = None) -> AsyncIterator[RunningBilling]:
    """Serves billing_svc for the duration of the block. Every call needs an internal token."""
    prices = load_prices(config.prices_file)
    async with contextlib.AsyncExitStack() as stack:
        db = Database(config.database_url)
        stack.push_async_callback(db.close)
        store = UsageStore(db)
        await store.migrate()
        if verifier is None:
            channel = await stack.enter_async_context(service_channel(config.auth_target, client_interceptors()))
            verifier = TokenVerifier(auth_jwks_fetcher(channel))
        registry = CollectorRegistry()
        server = await start_grpc_server(
            config.listen_address,
            lambda s: billing_pb2_grpc.add_BillingServiceServicer_to_server(BillingService(store, prices, registry), s),
            [SERVICE_NAME],
            metrics=("billing", registry, None if config.metrics_port < 0 else config.metrics_port),
            interceptors=[TokenInterceptor(verifier, BILLING_AUDIENCE)],
        )
        reconciler = asyncio.create_task(reconcile_forever(store, config.reconcile_after_s, config.reconcile_every_s))
        try:
            yield RunningBilling(server, store)
        finally:
            reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconciler
            await server.stop(config.shutdown_grace_s)


async def reconcile_forever(store: UsageStore, after_s: float, every_s: float) -> None:
    """Brings into the ledger the requests only inference_svc reported, once their reports are
    after_s old (the edge's own record normally comes within a second); never stops for an error.
    Replicas may all run it: each insert is idempotent."""
    while True:
        try:
            added = await store.reconcile(int((time.time() - after_s) * 1000))
            if added:
                log.warning("INTERRUPTED REQUESTS: %d request(s) the edge never reported were recorded from "
                            "inference_svc's reports (priced at zero)", added)
        except Exception as error:  # noqa: BLE001 - supervised: retried on the next tick
            log.error("reconciling generation reports failed, retrying: %s", error)
        await asyncio.sleep(every_s)


def main() -> None:
    run_service("billing_svc", lambda: running_billing(BillingConfig.from_env()))
