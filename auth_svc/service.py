"""The AuthService gRPC servicer."""

from __future__ import annotations

import json
import logging

from google.protobuf.timestamp_pb2 import Timestamp

from auth_svc.keys import looks_like_a_key
from auth_svc.store import ApiKey, KeyStore, Limits
from cloudach.auth.v1 import auth_pb2 as pb
from cloudach.auth.v1 import auth_pb2_grpc
from cloudach.errors import PermissionDenied, Unauthenticated
from cloudach.rpc.auth import caller
from cloudach.tokens import TokenSigner

log = logging.getLogger(__name__)

_STATUS = {"active": pb.KEY_STATUS_ACTIVE, "revoked": pb.KEY_STATUS_REVOKED}


def _timestamp(ms: int | None) -> Timestamp | None:
    if ms is None:
        return None
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def limits_pb(limits: Limits) -> pb.KeyLimits:
    return pb.KeyLimits(
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        max_concurrent_streams=limits.max_concurrent_streams,
        allowed_models=list(limits.allowed_models),
    )


def key_info(key: ApiKey) -> pb.ApiKeyInfo:
    return pb.ApiKeyInfo(
        key_id=key.key_id, display_prefix=key.display_prefix, organization=key.organization, name=key.name,
        status=_STATUS[key.status], limits=limits_pb(key.limits), created_at=_timestamp(key.created_at_ms),
        last_used_at=_timestamp(key.last_used_at_ms), admin=key.admin,
    )


def _require_admin() -> None:
    if not caller().get("adm"):
        raise PermissionDenied("this call needs an admin key", code="admin_required")


class AuthService(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, store: KeyStore, signer: TokenSigner) -> None:
        self._store = store
        self._signer = signer

    async def Authenticate(self, request: pb.AuthenticateRequest, context) -> pb.AuthenticateResponse:
        key = await self._store.find_active(request.api_key) if looks_like_a_key(request.api_key) else None
        if key is None:
            raise Unauthenticated("Incorrect API key provided.", code="invalid_api_key")
        token, expires = self._signer.sign(key.key_id, {"org": key.organization, "adm": key.admin})
        return pb.AuthenticateResponse(
            principal=pb.Principal(key_id=key.key_id, organization=key.organization, limits=limits_pb(key.limits), admin=key.admin),
            token=token,
            token_expires_at=_timestamp(expires * 1000),
        )

    async def GetSigningKeys(self, request: pb.GetSigningKeysRequest, context) -> pb.GetSigningKeysResponse:
        return pb.GetSigningKeysResponse(jwks_json=json.dumps(self._signer.jwks()))

    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context) -> pb.CreateApiKeyResponse:
        _require_admin()
        l = request.limits
        key, secret = await self._store.create(
            request.organization, request.name,
            Limits(l.requests_per_minute, l.tokens_per_minute, l.max_concurrent_streams, tuple(l.allowed_models)),
            admin=request.admin,
        )
        log.info("created API key %s (%s) for organization %s by %s", key.key_id, key.display_prefix,
                 key.organization, caller()["sub"])
        return pb.CreateApiKeyResponse(key=key_info(key), api_key=secret)

    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context) -> pb.ListApiKeysResponse:
        _require_admin()
        return pb.ListApiKeysResponse(keys=[key_info(k) for k in await self._store.list(request.organization)])

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context) -> pb.RevokeApiKeyResponse:
        _require_admin()
        key = await self._store.revoke(request.key_id)
        log.info("revoked API key %s by %s", key.key_id, caller()["sub"])
        return pb.RevokeApiKeyResponse(key=key_info(key))
