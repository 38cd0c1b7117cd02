"""auth_svc's composition root: database, signing key, servicer, gRPC server."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from cryptography.hazmat.primitives import serialization

from auth_svc.config import AuthConfig
from auth_svc.roles import PLATFORM_ADMIN, SERVICE
from auth_svc.service import AuthService
from auth_svc.store import KeyStore, Limits
from cloudach.auth.v1 import auth_pb2, auth_pb2_grpc
from cloudach.db import Database
from cloudach.rpc.auth import TokenInterceptor
from cloudach.rpc.server import RunningService, run_service, start_grpc_server
from cloudach.tokens import AUTH_AUDIENCE, TokenSigner, TokenVerifier, load_or_create_private_key

log = logging.getLogger(__name__)

SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
#: the organization of the services' own keys
SERVICE_ORGANIZATION = "cloudach"
#: what anyone may call: exchanging a key for a token, and reading the public keys
OPEN_METHODS = (f"/{SERVICE_NAME}/Authenticate", f"/{SERVICE_NAME}/GetSigningKeys")


@dataclass
class RunningAuth(RunningService):
    store: KeyStore
    signer: TokenSigner


def _signer(config: AuthConfig) -> TokenSigner:
    previous = [serialization.load_pem_public_key(pathlib.Path(p).read_bytes()) for p in config.previous_public_key_files]
    key = load_or_create_private_key(pathlib.Path(config.signing_key_file))
    return TokenSigner(key, config.token_ttl_s, previous)


async def bootstrap_key(store: KeyStore, path: pathlib.Path, role: str = PLATFORM_ADMIN,
                        organization: str = "local", name: str = "bootstrap admin") -> None:
    """Imports the key in path with role, or makes one there (mode 600) if the file is missing."""
    if path.exists():
        secret = path.read_text().strip()
        if not await store.exists(secret):
            await store.create(organization, name, Limits(), role=role, api_key=secret)
        return
    _, secret = await store.create(organization, name, Limits(), role=role)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")


@contextlib.asynccontextmanager
async def running_auth(config: AuthConfig) -> AsyncIterator[RunningAuth]:
    db = Database(config.database_url)
    try:
        store = KeyStore(db)
        await store.migrate()
        if config.bootstrap_admin_key_file:
            await bootstrap_key(store, pathlib.Path(config.bootstrap_admin_key_file))
        for service_key in config.bootstrap_service_key_files:
            # a service's identity, named after its file (e.g. "edge-service-key")
            await bootstrap_key(store, pathlib.Path(service_key), SERVICE, SERVICE_ORGANIZATION,
                                pathlib.Path(service_key).name)
        signer = _signer(config)

        async def local_jwks() -> dict:
            return signer.jwks()

        server = await start_grpc_server(
            config.listen_address,
            lambda s: auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthService(store, signer), s),
            [SERVICE_NAME],
            metrics=("auth", CollectorRegistry(), None if config.metrics_port < 0 else config.metrics_port),
            interceptors=[TokenInterceptor(TokenVerifier(local_jwks), AUTH_AUDIENCE, open_methods=OPEN_METHODS)],
        )
        try:
            yield RunningAuth(server, store, signer)
        finally:
            await server.stop(config.shutdown_grace_s)
    finally:
        await db.close()


def main() -> None:
    run_service("auth_svc", lambda: running_auth(AuthConfig.from_env()))
