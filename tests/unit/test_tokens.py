"""Internal tokens across clocks a little apart, and signing keys withdrawn while a service runs."""

from __future__ import annotations

import asyncio
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloudach import tokens
from cloudach.errors import Unauthenticated
from cloudach.tokens import INFERENCE, INFERENCE_AUDIENCE as AUD, TokenSigner, TokenVerifier, VerifierSettings


def signed_at(signer: TokenSigner, offset_s: float, monkeypatch) -> str:
    """A token signed by a host whose clock is offset_s ahead of ours."""
    real = time.time
    monkeypatch.setattr(tokens.time, "time", lambda: real() + offset_s)
    token = signer.sign("key_1", {"org": "o"}, AUD, (INFERENCE,))[0]
    monkeypatch.setattr(tokens.time, "time", real)
    return token


@pytest.mark.parametrize("offset_s, accepted", [(10, True), (-(60 + 10), True), (45, False), (-(60 + 45), False)])
async def test_clocks_apart_by_less_than_the_leeway_still_agree(monkeypatch, offset_s, accepted):
    signer = TokenSigner(Ed25519PrivateKey.generate(), ttl_s=60)

    async def jwks():
        return signer.jwks()

    verifier = TokenVerifier(jwks, settings=VerifierSettings(leeway_s=30, jwks_max_age_s=300))
    token = signed_at(signer, offset_s, monkeypatch)  # ahead: issued "in the future"; behind: expired
    if accepted:
        assert (await verifier.verify(token, AUD))["sub"] == "key_1"
    else:
        with pytest.raises(Unauthenticated):
            await verifier.verify(token, AUD)


async def test_a_withdrawn_signing_key_stops_being_trusted_after_the_max_age():
    old, new = TokenSigner(Ed25519PrivateKey.generate(), 300), TokenSigner(Ed25519PrivateKey.generate(), 300)
    published = [old]

    async def jwks():
        return {"keys": [k for s in published for k in s.jwks()["keys"]]}

    verifier = TokenVerifier(jwks, min_refetch_s=0, settings=VerifierSettings(leeway_s=0, jwks_max_age_s=0.2))
    token = old.sign("key_1", {}, AUD, (INFERENCE,))[0]
    assert await verifier.verify(token, AUD)
    published[:] = [new]  # auth_svc rotated and withdrew the old key
    assert await verifier.verify(token, AUD)  # still within the copy's max age
    await asyncio.sleep(0.3)
    with pytest.raises(Unauthenticated):
        await verifier.verify(token, AUD)
    assert await verifier.verify(new.sign("key_1", {}, AUD, (INFERENCE,))[0], AUD)


async def test_calls_arriving_during_the_first_fetch_wait_for_it_instead_of_failing():
    signer = TokenSigner(Ed25519PrivateKey.generate(), 300)
    fetches = 0

    async def slow_jwks():
        nonlocal fetches
        fetches += 1
        await asyncio.sleep(0.1)
        return signer.jwks()

    verifier = TokenVerifier(slow_jwks, settings=VerifierSettings(leeway_s=0, jwks_max_age_s=300))
    token = signer.sign("key_1", {}, AUD, (INFERENCE,))[0]
    claims = await asyncio.gather(*(verifier.verify(token, AUD) for _ in range(20)))
    assert all(c["sub"] == "key_1" for c in claims) and fetches == 1


async def test_a_token_is_good_for_its_own_audience_only():
    signer = TokenSigner(Ed25519PrivateKey.generate(), 300)

    async def jwks():
        return signer.jwks()

    verifier = TokenVerifier(jwks)
    token = signer.sign("key_1", {"org": "o"}, tokens.INFERENCE_AUDIENCE, (tokens.INFERENCE,))[0]
    assert (await verifier.verify(token, tokens.INFERENCE_AUDIENCE))["scope"] == "inference"
    for elsewhere in (tokens.BILLING_AUDIENCE, tokens.AUTH_AUDIENCE):
        with pytest.raises(Unauthenticated):
            await verifier.verify(token, elsewhere)


async def test_a_token_checked_once_is_remembered_only_until_it_expires(monkeypatch):
    signer = TokenSigner(Ed25519PrivateKey.generate(), ttl_s=1)

    async def jwks():
        return signer.jwks()

    verifier = TokenVerifier(jwks, settings=VerifierSettings(leeway_s=0, jwks_max_age_s=3600))
    token = signer.sign("key_1", {}, AUD, (INFERENCE,))[0]
    assert (await verifier.verify(token, AUD))["sub"] == "key_1"
    checks = 0
    check = verifier._check

    async def counted(*args):
        nonlocal checks
        checks += 1
        return await check(*args)

    monkeypatch.setattr(verifier, "_check", counted)
    for _ in range(5):
        assert (await verifier.verify(token, AUD))["sub"] == "key_1"
    assert checks == 0  # the same caller's token, from memory
    with pytest.raises(Unauthenticated):
        await verifier.verify(token, tokens.BILLING_AUDIENCE)  # remembered for its audience only
    await asyncio.sleep(2.1)  # past its exp (whole seconds)
    with pytest.raises(Unauthenticated):
        await verifier.verify(token, AUD)
    assert checks == 2  # checked again, not taken from memory
