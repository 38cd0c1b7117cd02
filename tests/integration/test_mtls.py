"""Mutual TLS between the services, with a CA and certificates this test makes: auth_svc and
billing_svc serve only clients with a certificate the CA signed; billing_svc's own channel to
auth_svc (its signing keys) and a caller's channel work with theirs; a plaintext client, one
without a certificate, and one with a stranger CA's certificate are all refused."""

from __future__ import annotations

import datetime
import ipaddress
import pathlib

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.timestamp_pb2 import Timestamp

from auth_svc.server import running_auth
from billing_svc.server import running_billing
from cloudach.auth.v1 import auth_pb2
from cloudach.auth.v1.auth_pb2_grpc import AuthServiceStub
from cloudach.billing.v1 import billing_pb2
from cloudach.billing.v1.billing_pb2_grpc import BillingServiceStub
from cloudach.rpc.client import service_channel
from cloudach.rpc.tls import TlsSettings
from tests.integration.services import MODEL, SERVICE_KEY, auth_config, billing_config


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer_name: x509.Name, issuer_key, ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(path: pathlib.Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def make_pki(directory: pathlib.Path, name: str) -> dict[str, TlsSettings]:
    """A CA and two certificates it signed ("server", "client"), as TlsSettings."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(f"{name} CA", ca_key, _name(f"{name} CA"), ca_key, ca=True)
    ca_file = _pem(directory / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    settings = {}
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"{name} {role}", key, ca.subject, ca_key)
        settings[role] = TlsSettings(
            cert_file=_pem(directory / f"{role}.pem", cert.public_bytes(serialization.Encoding.PEM)),
            key_file=_pem(directory / f"{role}-key.pem", key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
            ca_file=ca_file)
    return settings


def _env(monkeypatch, tls: TlsSettings) -> None:
    monkeypatch.setenv("CLOUDACH_TLS_CERT_FILE", tls.cert_file)
    monkeypatch.setenv("CLOUDACH_TLS_KEY_FILE", tls.key_file)
    monkeypatch.setenv("CLOUDACH_TLS_CA_FILE", tls.ca_file)


async def _authenticate(channel: grpc.aio.Channel) -> auth_pb2.AuthenticateResponse:
    return await AuthServiceStub(channel).Authenticate(auth_pb2.AuthenticateRequest(api_key=SERVICE_KEY), timeout=5)


async def test_services_speak_mutual_tls_and_refuse_whoever_lacks_a_certificate_from_the_ca(tmp_path, monkeypatch):
    ours = make_pki(tmp_path / "ours", "cloudach")
    stranger = make_pki(tmp_path / "stranger", "stranger")
    _env(monkeypatch, ours["server"])  # the services below read their settings from the environment
    async with running_auth(auth_config(tmp_path)) as auth:
        async with running_billing(billing_config(tmp_path, auth)) as billing:
            async with service_channel(auth.address, tls=ours["client"]) as channel:
                reply = await _authenticate(channel)
            stamp = Timestamp()
            stamp.GetCurrentTime()
            record = billing_pb2.UsageRecord(request_id="mtls-1", key_id="k", organization="o", model=MODEL,
                                             outcome=billing_pb2.OUTCOME_COMPLETED, started_at=stamp, ended_at=stamp)
            # billing_svc verifies the token with keys it fetched from auth_svc over its own mTLS channel.
            async with service_channel(billing.address, tls=ours["client"]) as channel:
                recorded = await BillingServiceStub(channel).RecordUsage(
                    billing_pb2.RecordUsageRequest(record=record), metadata=(("authorization", f"Bearer {reply.token}"),),
                    timeout=10)
            assert recorded.created
            no_certificate = grpc.aio.secure_channel(
                auth.address, grpc.ssl_channel_credentials(root_certificates=pathlib.Path(ours["client"].ca_file).read_bytes()))
            refused = {
                "plaintext": grpc.aio.insecure_channel(auth.address),
                "no client certificate": no_certificate,
                "a stranger CA's certificate": service_channel(
                    auth.address, tls=TlsSettings(stranger["client"].cert_file, stranger["client"].key_file,
                                                  ours["client"].ca_file)),
            }
            for name, channel in refused.items():
                async with channel:
                    with pytest.raises(grpc.aio.AioRpcError) as failed:
                        await _authenticate(channel)
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, name
            # And a client that trusts only the stranger CA does not accept our server.
            async with service_channel(auth.address, tls=stranger["client"]) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as untrusted:
                    await _authenticate(channel)
            assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_partial_tls_configuration_is_refused_at_start(monkeypatch):
    monkeypatch.setenv("CLOUDACH_TLS_CERT_FILE", "/some/cert.pem")
    with pytest.raises(ValueError, match="CLOUDACH_TLS_KEY_FILE"):
        TlsSettings.from_env()
