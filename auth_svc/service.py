"""The AuthService gRPC servicer."""

from __future__ import annotations

import json
import logging

from google.protobuf.timestamp_pb2 import Timestamp

from auth_svc import roles
from auth_svc.keys import looks_like_a_key
from auth_svc.store import ApiKey, Budget, KeyStore, Limits
from cloudach.auth.v1 import auth_pb2 as pb
from cloudach.auth.v1 import auth_pb2_grpc
from cloudach.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from cloudach.rpc.auth import require, scopes
from cloudach.tokens import ALL_ORGANIZATIONS, KEYS_ADMIN, TOKENS_ISSUE, TokenSigner

log = logging.getLogger(__name__)

_STATUS = {"active": pb.KEY_STATUS_ACTIVE, "revoked": pb.KEY_STATUS_REVOKED}
ROLE_PB = {roles.MEMBER: pb.KEY_ROLE_MEMBER, roles.ORG_ADMIN: pb.KEY_ROLE_ORG_ADMIN,
           roles.PLATFORM_ADMIN: pb.KEY_ROLE_PLATFORM_ADMIN, roles.SERVICE: pb.KEY_ROLE_SERVICE}
PB_ROLE = {v: k for k, v in ROLE_PB.items()}


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
        budget_daily_micros=limits.budget_daily_micros,
        budget_monthly_micros=limits.budget_monthly_micros,
    )


def key_info(key: ApiKey) -> pb.ApiKeyInfo:
    return pb.ApiKeyInfo(
        key_id=key.key_id, display_prefix=key.display_prefix, organization=key.organization, name=key.name,
        status=_STATUS[key.status], limits=limits_pb(key.limits), created_at=_timestamp(key.created_at_ms),
        last_used_at=_timestamp(key.last_used_at_ms), admin=key.admin, role=ROLE_PB[key.role],
    )


def _admin() -> tuple[str, bool]:
    """The admin caller's organization, and whether it may act on every organization."""
    claims = require(KEYS_ADMIN)
    return str(claims.get("org", "")), ALL_ORGANIZATIONS in scopes(claims)


def _own(organization: str, admin_org: str, everywhere: bool) -> None:
    if not everywhere and organization != admin_org:
        raise PermissionDenied("an organization's admin manages only its own organization's keys",
                               code="admin_required")


class AuthService(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, store: KeyStore, signer: TokenSigner) -> None:
        self._store = store
        self._signer = signer

    async def Authenticate(self, request: pb.AuthenticateRequest, context) -> pb.AuthenticateResponse:
        key = await self._store.find_active(request.api_key) if looks_like_a_key(request.api_key) else None
        if key is None:
            raise Unauthenticated("Incorrect API key provided.", code="invalid_api_key")
        return await self._tokens(key, request.purpose)

    async def IssueKeyToken(self, request: pb.IssueKeyTokenRequest, context) -> pb.AuthenticateResponse:
        require(TOKENS_ISSUE)
        try:
            key = await self._store.get(request.key_id)
        except NotFound:
            raise NotFound(f"no API key {request.key_id}", param="key_id") from None
        if key.status != "active":
            raise Unauthenticated(f"API key {key.key_id} was revoked", code="invalid_api_key")
        if key.role == roles.SERVICE:
            raise PermissionDenied("a service key's tokens are not issued for it", code="admin_required")
        return await self._tokens(key, pb.PURPOSE_API)

    async def _tokens(self, key: ApiKey, purpose: int) -> pb.AuthenticateResponse:
        claims = {"org": key.organization}
        usage_token = ""
        if purpose == pb.PURPOSE_ADMIN:
            grant = roles.admin_grant(key.role)
            if grant is None:
                raise PermissionDenied("this key is not an admin key", code="admin_required")
        else:
            grant, usage = roles.api_grants(key.role)
            if usage is not None:
                usage_token, _ = self._signer.sign(key.key_id, claims, *usage)
        token, expires = self._signer.sign(key.key_id, claims, *grant)
        budget = await self._store.organization_budget(key.organization)
        return pb.AuthenticateResponse(
            principal=pb.Principal(key_id=key.key_id, organization=key.organization, limits=limits_pb(key.limits),
                                   admin=key.admin, role=ROLE_PB[key.role],
                                   organization_budget=pb.Budget(daily_micros=budget.daily_micros,
                                                                 monthly_micros=budget.monthly_micros)),
            token=token,
            token_expires_at=_timestamp(expires * 1000),
            usage_token=usage_token,
        )

    async def GetSigningKeys(self, request: pb.GetSigningKeysRequest, context) -> pb.GetSigningKeysResponse:
        return pb.GetSigningKeysResponse(jwks_json=json.dumps(self._signer.jwks()))

    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context) -> pb.CreateApiKeyResponse:
        admin_org, everywhere = _admin()
        organization = request.organization or admin_org
        _own(organization, admin_org, everywhere)
        if request.role not in PB_ROLE:
            raise InvalidArgument("unknown role", param="role")
        role = roles.PLATFORM_ADMIN if request.admin else PB_ROLE[request.role]
        if not everywhere and role not in roles.ORG_ADMIN_MAY_CREATE:
            raise PermissionDenied(f"only a platform admin may create a {role} key", code="admin_required")
        l = request.limits
        key, secret = await self._store.create(
            organization, request.name,
            Limits(l.requests_per_minute, l.tokens_per_minute, l.max_concurrent_streams, tuple(l.allowed_models),
                   l.budget_daily_micros, l.budget_monthly_micros),
            role=role,
        )
        log.info("created API key %s (%s, %s) for organization %s by %s", key.key_id, key.display_prefix, role,
                 key.organization, require(KEYS_ADMIN)["sub"])
        return pb.CreateApiKeyResponse(key=key_info(key), api_key=secret)

    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context) -> pb.ListApiKeysResponse:
        admin_org, everywhere = _admin()
        organization = request.organization if everywhere else (request.organization or admin_org)
        _own(organization or admin_org, admin_org, everywhere)
        return pb.ListApiKeysResponse(keys=[key_info(k) for k in await self._store.list(organization)])

    async def _managed(self, key_id: str, action: str) -> ApiKey:
        """The key an admin caller may act on (another organization's reads as unknown)."""
        admin_org, everywhere = _admin()
        try:
            target = await self._store.get(key_id)
        except NotFound:
            raise NotFound(f"no API key {key_id}", param="key_id") from None
        if not everywhere and target.organization != admin_org:
            raise NotFound(f"no API key {key_id}", param="key_id")  # another organization's: not told
        if not everywhere and target.role not in roles.ORG_ADMIN_MAY_CREATE:
            raise PermissionDenied(f"only a platform admin may {action} a {target.role} key", code="admin_required")
        return target

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context) -> pb.RevokeApiKeyResponse:
        await self._managed(request.key_id, "revoke")
        key = await self._store.revoke(request.key_id)
        log.info("revoked API key %s by %s", key.key_id, require(KEYS_ADMIN)["sub"])
        return pb.RevokeApiKeyResponse(key=key_info(key))

    async def UpdateApiKey(self, request: pb.UpdateApiKeyRequest, context) -> pb.UpdateApiKeyResponse:
        await self._managed(request.key_id, "update")
        key = await self._store.set_key_budget(
            request.key_id,
            request.budget_daily_micros if request.HasField("budget_daily_micros") else None,
            request.budget_monthly_micros if request.HasField("budget_monthly_micros") else None)
        log.info("updated the budgets of API key %s by %s", key.key_id, require(KEYS_ADMIN)["sub"])
        return pb.UpdateApiKeyResponse(key=key_info(key))

    async def SetOrganizationBudget(self, request: pb.SetOrganizationBudgetRequest,
                                    context) -> pb.SetOrganizationBudgetResponse:
        admin_org, everywhere = _admin()
        organization = request.organization or admin_org
        _own(organization, admin_org, everywhere)
        budget = await self._store.set_organization_budget(
            organization, Budget(request.budget.daily_micros, request.budget.monthly_micros))
        log.info("set the budget of organization %s by %s", organization, require(KEYS_ADMIN)["sub"])
        return pb.SetOrganizationBudgetResponse(
            organization=organization, budget=pb.Budget(daily_micros=budget.daily_micros,
                                                        monthly_micros=budget.monthly_micros))
