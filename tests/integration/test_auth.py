"""auth_svc: the key store on SQLite and PostgreSQL, its RPCs and tokens, the CLI, and the
token checks of the services that trust it (each rejection case)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time

import grpc
import jwt
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from auth_svc.keys import key_hash
from auth_svc.server import running_auth
from auth_svc.store import KeyStore, Limits
from cloudach.auth.v1 import auth_pb2 as pb
from cloudach.auth.v1.auth_pb2_grpc import AuthServiceStub
from cloudach.db import Database
from cloudach.errors import PermissionDenied
from cloudach.outbox import ServiceToken
from cloudach.inference.v1 import inference_pb2, inference_pb2_grpc
from tools.launcher.ports import free_ports
from cloudach.rpc.auth import auth_jwks_fetcher
from cloudach.billing.v1 import billing_pb2
from cloudach.billing.v1.billing_pb2_grpc import BillingServiceStub
from cloudach.tokens import (AUTH_AUDIENCE, BILLING_AUDIENCE, INFERENCE, INFERENCE_AUDIENCE, ISSUER, TokenSigner,
                             TokenVerifier)
from inference_svc.server import running_inference
from tests.integration.services import API_KEY, MODEL, SERVICE_KEY, auth_config, inference_config, run_cli
from tests.fakes import FakeEngine



async def test_replicas_starting_at_once_apply_each_migration_exactly_once(database):
    """Several processes migrating one database together (edges sharing a host, auth replicas)."""
    from auth_svc.store import MIGRATIONS

    others = [Database(database._url) for _ in range(3)]
    try:
        counts = await asyncio.gather(*(db.migrate("auth", MIGRATIONS) for db in [database, *others]))
    finally:
        for db in others:
            await db.close()
    # each migration runs under its own lock, so two replicas may share the work: once each in all
    assert sum(counts) == len(MIGRATIONS), counts


async def test_store_keeps_only_hashes_and_finds_revokes_and_lists(database):
    store = KeyStore(database)
    await store.migrate()
    await store.migrate()  # applied once; a second start changes nothing
    key, secret = await store.create("acme", "ci", Limits(60, 10_000, 2, ("smollm2-135m-instruct",)))
    assert secret.startswith("ck-") and len(secret) >= 43
    rows = await database.fetchall("SELECT * FROM api_keys")
    assert secret not in json.dumps([list(map(str, r)) for r in rows])
    assert key_hash(secret) in json.dumps([list(map(str, r)) for r in rows])
    found = await store.find_active(secret)
    assert found.key_id == key.key_id and found.limits.allowed_models == ("smollm2-135m-instruct",)
    assert (await store.get(key.key_id)).last_used_at_ms is not None
    assert await store.find_active(secret + "x") is None
    other, _ = await store.create("globex", "b", Limits())
    assert [k.key_id for k in await store.list("acme")] == [key.key_id]
    assert {k.key_id for k in await store.list()} == {key.key_id, other.key_id}
    assert (await store.revoke(key.key_id)).status == "revoked"
    assert await store.find_active(secret) is None


async def auth_stub_call(auth, method, request, token=None):
    async with grpc.aio.insecure_channel(auth.address) as channel:
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        return await getattr(AuthServiceStub(channel), method)(request, metadata=metadata, timeout=5)


def _claims(auth, token: str, audience: str) -> dict:
    return jwt.decode(token, auth.signer._key.public_key(), algorithms=["EdDSA"], audience=audience, issuer=ISSUER)


async def test_authenticate_returns_the_principal_and_a_verifiable_eddsa_token(auth):
    reply = await auth_stub_call(auth, "Authenticate", pb.AuthenticateRequest(api_key=API_KEY))
    assert reply.principal.admin and reply.principal.organization == "local"
    assert reply.principal.role == pb.KEY_ROLE_PLATFORM_ADMIN
    header = jwt.get_unverified_header(reply.token)
    assert header["alg"] == "EdDSA" and header["kid"] == auth.signer.kid
    jwks = json.loads((await auth_stub_call(auth, "GetSigningKeys", pb.GetSigningKeysRequest())).jwks_json)
    key = jwt.PyJWK(next(k for k in jwks["keys"] if k["kid"] == header["kid"])).key
    claims = jwt.decode(reply.token, key, algorithms=["EdDSA"], audience=INFERENCE_AUDIENCE, issuer=ISSUER)
    assert claims["sub"] == reply.principal.key_id and 0 < claims["exp"] - claims["iat"] <= 300
    # The token the edge forwards is good for inference only, even an admin key's.
    assert claims["scope"] == "inference" and claims["aud"] == INFERENCE_AUDIENCE
    assert _claims(auth, reply.usage_token, BILLING_AUDIENCE)["scope"] == "usage:read platform"
    admin = await auth_stub_call(auth, "Authenticate", pb.AuthenticateRequest(api_key=API_KEY, purpose=pb.PURPOSE_ADMIN))
    assert _claims(auth, admin.token, AUTH_AUDIENCE)["scope"] == "keys:admin usage:read platform"


async def test_tokens_carry_only_what_each_role_may_do(auth, billing, inference):
    _, member = await auth.store.create("acme", "member", Limits())
    _, service = await auth.store.create("cloudach", "svc", Limits(), role="service")
    api = await auth_stub_call(auth, "Authenticate", pb.AuthenticateRequest(api_key=API_KEY))
    with pytest.raises(grpc.aio.AioRpcError) as not_admin:
        await auth_stub_call(auth, "Authenticate", pb.AuthenticateRequest(api_key=member, purpose=pb.PURPOSE_ADMIN))
    assert not_admin.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A forwarded token replayed at the admin RPCs (even an admin key's): not for this audience.
    with pytest.raises(grpc.aio.AioRpcError) as replayed:
        await auth_stub_call(auth, "ListApiKeys", pb.ListApiKeysRequest(), token=api.token)
    assert replayed.value.code() == grpc.StatusCode.UNAUTHENTICATED
    stamp = Timestamp()
    stamp.GetCurrentTime()
    forged = billing_pb2.RecordUsageRequest(record=billing_pb2.UsageRecord(
        request_id=f"forged-{time.time_ns()}", key_id="k", organization="victim", model=MODEL, outcome=billing_pb2.OUTCOME_COMPLETED,
        started_at=stamp, ended_at=stamp))
    member_api = await auth_stub_call(auth, "Authenticate", pb.AuthenticateRequest(api_key=member))
    async with grpc.aio.insecure_channel(billing.address) as channel:
        stub = BillingServiceStub(channel)
        for token, code in ((api.token, grpc.StatusCode.UNAUTHENTICATED),  # the forwarded one: wrong audience
                            (member_api.usage_token, grpc.StatusCode.PERMISSION_DENIED)):  # no usage:write
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.RecordUsage(forged, metadata=(("authorization", f"Bearer {token}"),), timeout=5)
            assert refused.value.code() == code
        with pytest.raises(grpc.aio.AioRpcError) as elsewhere:
            await stub.GetUsage(billing_pb2.GetUsageRequest(organization="victim"),
                                metadata=(("authorization", f"Bearer {member_api.usage_token}"),), timeout=5)
        assert elsewhere.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Only a service identity records usage; it can do nothing else.
        service_api = await auth_stub_call(auth, "Authenticate", pb.AuthenticateRequest(api_key=service))
        assert not service_api.usage_token
        recorded = await stub.RecordUsage(forged, metadata=(("authorization", f"Bearer {service_api.token}"),), timeout=5)
        assert recorded.created
    async with grpc.aio.insecure_channel(inference.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as not_inference:
            await inference_pb2_grpc.InferenceServiceStub(channel).ListModels(
                inference_pb2.ListModelsRequest(), metadata=(("authorization", f"Bearer {service_api.token}"),), timeout=5)
    assert not_inference.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_organization_admins_manage_only_their_own_organization(auth):
    _, org_admin = await auth.store.create("umbrella", "its admin", Limits(), role="org_admin")
    other, _ = await auth.store.create("globex", "someone else", Limits())
    platform, _ = await auth.store.create("umbrella", "ops", Limits(), role="platform_admin")
    service, _ = await auth.store.create("umbrella", "svc", Limits(), role="service")
    token = (await auth_stub_call(auth, "Authenticate",
                                  pb.AuthenticateRequest(api_key=org_admin, purpose=pb.PURPOSE_ADMIN))).token
    made = await auth_stub_call(auth, "CreateApiKey", pb.CreateApiKeyRequest(name="dev"), token=token)
    assert made.key.organization == "umbrella" and made.key.role == pb.KEY_ROLE_MEMBER
    listed = await auth_stub_call(auth, "ListApiKeys", pb.ListApiKeysRequest(), token=token)
    assert {k.organization for k in listed.keys} == {"umbrella"} and len(listed.keys) == 4
    refusals = [
        ("CreateApiKey", pb.CreateApiKeyRequest(organization="globex"), grpc.StatusCode.PERMISSION_DENIED),
        ("CreateApiKey", pb.CreateApiKeyRequest(role=pb.KEY_ROLE_PLATFORM_ADMIN), grpc.StatusCode.PERMISSION_DENIED),
        ("CreateApiKey", pb.CreateApiKeyRequest(admin=True), grpc.StatusCode.PERMISSION_DENIED),
        ("CreateApiKey", pb.CreateApiKeyRequest(role=pb.KEY_ROLE_SERVICE), grpc.StatusCode.PERMISSION_DENIED),
        ("ListApiKeys", pb.ListApiKeysRequest(organization="globex"), grpc.StatusCode.PERMISSION_DENIED),
        ("RevokeApiKey", pb.RevokeApiKeyRequest(key_id=other.key_id), grpc.StatusCode.NOT_FOUND),
        ("RevokeApiKey", pb.RevokeApiKeyRequest(key_id=platform.key_id), grpc.StatusCode.PERMISSION_DENIED),
        ("RevokeApiKey", pb.RevokeApiKeyRequest(key_id=service.key_id), grpc.StatusCode.PERMISSION_DENIED),
        ("UpdateApiKey", pb.UpdateApiKeyRequest(key_id=other.key_id, budget_daily_micros=1), grpc.StatusCode.NOT_FOUND),
        ("SetOrganizationBudget", pb.SetOrganizationBudgetRequest(organization="globex"),
         grpc.StatusCode.PERMISSION_DENIED),
        # Only a service identity may have a key's tokens issued (to run its batch jobs).
        ("IssueKeyToken", pb.IssueKeyTokenRequest(key_id=other.key_id), grpc.StatusCode.PERMISSION_DENIED),
    ]
    for method, request, code in refusals:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await auth_stub_call(auth, method, request, token=token)
        assert refused.value.code() == code, (method, request)
    assert {(await auth.store.get(k.key_id)).status for k in (other, platform, service)} == {"active"}


async def test_a_service_identity_that_is_not_a_service_key_says_so(auth):
    async with grpc.aio.insecure_channel(auth.address) as channel:
        with pytest.raises(PermissionDenied, match="not a service key"):
            await ServiceToken(AuthServiceStub(channel), API_KEY).metadata()  # a platform admin's key
        assert await ServiceToken(AuthServiceStub(channel), SERVICE_KEY).metadata()


@pytest.mark.parametrize("api_key", ["", "ck-short", "sk-" + "a" * 48, "ck-" + "b" * 43])
async def test_unknown_or_malformed_keys_are_unauthenticated(auth, api_key):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await auth_stub_call(auth, "Authenticate", pb.AuthenticateRequest(api_key=api_key))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_admin_rpcs_need_an_admin_token(auth):
    request = pb.ListApiKeysRequest()
    with pytest.raises(grpc.aio.AioRpcError) as no_token:
        await auth_stub_call(auth, "ListApiKeys", request)
    # A token for auth_svc without the keys:admin scope.
    user = auth.signer.sign("key_user", {"org": "acme"}, AUTH_AUDIENCE, ("usage:read",))[0]
    with pytest.raises(grpc.aio.AioRpcError) as not_admin:
        await auth_stub_call(auth, "ListApiKeys", request, token=user)
    assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not_admin.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_cli_creates_lists_and_revokes_keys(auth):
    base = ["keys", "--auth-target", auth.address]
    created = await asyncio.to_thread(run_cli, *base, "create", "--org", "initech", "--rpm", "5", "--tpm", "900",
                                      "--max-concurrency", "2", "--models", "smollm2-135m-instruct")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.split("store it now): ")[1].strip()
    key_id = created.stdout.split()[1]
    assert (await auth.store.find_active(secret)).limits == Limits(5, 900, 2, ("smollm2-135m-instruct",))
    listed = await asyncio.to_thread(run_cli, *base, "list", "--org", "initech", "--json")
    rows = json.loads(listed.stdout)
    assert [(k["key_id"], k["rpm"], k["status"]) for k in rows] == [(key_id, 5, "active")]
    assert secret not in listed.stdout
    revoked = await asyncio.to_thread(run_cli, *base, "revoke", key_id)
    assert revoked.returncode == 0 and await auth.store.find_active(secret) is None
    refused = await asyncio.to_thread(run_cli, *base, "list", api_key=secret)
    assert refused.returncode == 1 and "error:" in refused.stderr


# -- the services that trust auth_svc's tokens ----------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256_with_public_key(auth) -> str:
    """The classic confusion attack: HMAC-sign with the published public key as the secret."""
    public_pem = auth.signer._key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": auth.signer.kid}).encode())
    body = _b64(json.dumps({"sub": "x", "iss": ISSUER, "aud": INFERENCE_AUDIENCE, "iat": now, "exp": now + 60}).encode())
    signature = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(signature)}"


def bad_tokens(auth) -> dict[str, str]:
    good = auth.signer.sign("key_x", {"org": "o"}, INFERENCE_AUDIENCE, (INFERENCE,))[0]
    now = int(time.time())
    claims = {"sub": "key_x", "iss": ISSUER, "aud": INFERENCE_AUDIENCE, "iat": now - 600, "exp": now - 300}
    head, body, sig = good.split(".")
    forged_body = _b64(json.dumps({**json.loads(base64.urlsafe_b64decode(body + "==")), "adm": True}).encode())
    stranger = TokenSigner(Ed25519PrivateKey.generate(), 60)
    return {
        "none": "",
        "garbage": "not.a.token",
        "expired": jwt.encode(claims, auth.signer._key, algorithm="EdDSA", headers={"kid": auth.signer.kid}),
        "tampered": f"{head}.{forged_body}.{sig}",
        "wrong audience": jwt.encode({**claims, "aud": "someone-else", "exp": now + 60}, auth.signer._key,
                                     algorithm="EdDSA", headers={"kid": auth.signer.kid}),
        "alg none": jwt.encode({**claims, "exp": now + 60}, None, algorithm="none"),
        "hs256 with the public key": _hs256_with_public_key(auth),
        "unknown signer": stranger.sign("key_x", {}, INFERENCE_AUDIENCE, (INFERENCE,))[0],
    }


async def test_inference_svc_refuses_every_bad_token(auth, inference):
    async with grpc.aio.insecure_channel(inference.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for name, token in bad_tokens(auth).items():
            metadata = (("authorization", f"Bearer {token}"),) if token else ()
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.ListModels(inference_pb2.ListModelsRequest(), metadata=metadata, timeout=5)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                async for _ in stub.Generate(inference_pb2.GenerateRequest(), metadata=metadata, timeout=5):
                    pass
            assert streamed.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        good = auth.signer.sign("key_x", {"org": "o"}, INFERENCE_AUDIENCE, (INFERENCE,))[0]
        reply = await stub.ListModels(inference_pb2.ListModelsRequest(), metadata=(("authorization", f"Bearer {good}"),))
        assert reply.models


async def test_a_rotated_signing_key_is_picked_up_by_kid(tmp_path, registry):
    """auth_svc restarts with a new key and still publishes the old one: both kinds of token work."""
    (port,) = free_ports(1)
    (tmp_path / "a").mkdir()
    first = auth_config(tmp_path / "a", listen_address=f"127.0.0.1:{port}")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as auth_channel:
        verifier = TokenVerifier(auth_jwks_fetcher(auth_channel), min_refetch_s=0)
        async with running_auth(first) as old:
            old_token = old.signer.sign("key_old", {}, INFERENCE_AUDIENCE, (INFERENCE,))[0]
            old_public = tmp_path / "old-public.pem"
            old_public.write_bytes(old.signer._key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
            async with running_inference(inference_config(old), engine=FakeEngine(), registry=registry, verifier=verifier) as inf:
                async with grpc.aio.insecure_channel(inf.address) as channel:
                    stub = inference_pb2_grpc.InferenceServiceStub(channel)
                    await stub.ListModels(inference_pb2.ListModelsRequest(), metadata=(("authorization", f"Bearer {old_token}"),))
                    rotated = auth_config(tmp_path / "a", listen_address=f"127.0.0.1:{port}",
                                          signing_key_file=str(tmp_path / "new-key.pem"),
                                          previous_public_key_files=(str(old_public),))
                    await old.grpc.stop(0)
                    async with running_auth(rotated) as new:
                        assert new.signer.kid != old.signer.kid
                        for token in (new.signer.sign("key_new", {}, INFERENCE_AUDIENCE, (INFERENCE,))[0], old_token):
                            await stub.ListModels(inference_pb2.ListModelsRequest(),
                                                  metadata=(("authorization", f"Bearer {token}"),), timeout=5)


async def test_a_service_identity_gets_an_active_keys_tokens_and_never_a_revoked_ones(auth):
    key, _ = await auth.store.create("umbrella", "batcher", Limits(budget_daily_micros=7))
    async with grpc.aio.insecure_channel(auth.address) as channel:
        billing_token = await ServiceToken(AuthServiceStub(channel), SERVICE_KEY).metadata()
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # the token a service sends billing_svc mints nothing
            await AuthServiceStub(channel).IssueKeyToken(pb.IssueKeyTokenRequest(key_id=key.key_id),
                                                         metadata=billing_token)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        identity = await ServiceToken(AuthServiceStub(channel), SERVICE_KEY, purpose=pb.PURPOSE_ADMIN).metadata()
        issued = await AuthServiceStub(channel).IssueKeyToken(pb.IssueKeyTokenRequest(key_id=key.key_id),
                                                              metadata=identity)
        assert issued.principal.key_id == key.key_id and issued.principal.limits.budget_daily_micros == 7
        assert issued.token and issued.usage_token
        await auth.store.revoke(key.key_id)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await AuthServiceStub(channel).IssueKeyToken(pb.IssueKeyTokenRequest(key_id=key.key_id), metadata=identity)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
