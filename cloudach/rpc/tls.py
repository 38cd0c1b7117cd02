"""Optional mutual TLS between the services: with a certificate, its key and a CA configured
(the same variables for every service, each with its own certificate), every gRPC server asks
for and verifies a client certificate signed by the CA, and every channel presents its own and
verifies the server's. Without them, channels and servers are plaintext (loopback, or a mesh
that provides mTLS, as Istio or Linkerd do in Kubernetes).

Triton's channel is not covered: Triton has its own TLS settings (`--grpc-use-ssl`)."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import grpc

from cloudach.config import from_env, setting


@dataclass(frozen=True)
class TlsSettings:
    #: this service's certificate (PEM), presented as server and as client
    cert_file: str = setting("", "CLOUDACH_TLS_CERT_FILE")
    #: its private key (PEM)
    key_file: str = setting("", "CLOUDACH_TLS_KEY_FILE")
    #: the CA (PEM) that signed every service's certificate: the only one trusted
    ca_file: str = setting("", "CLOUDACH_TLS_CA_FILE")
    #: the name the servers' certificates are checked for, when not the target's host
    server_name: str = setting("", "CLOUDACH_TLS_SERVER_NAME")

    @classmethod
    def from_env(cls) -> TlsSettings:
        settings = from_env(cls)
        given = [bool(settings.cert_file), bool(settings.key_file), bool(settings.ca_file)]
        if any(given) and not all(given):
            raise ValueError("mutual TLS needs all of CLOUDACH_TLS_CERT_FILE, CLOUDACH_TLS_KEY_FILE, CLOUDACH_TLS_CA_FILE")
        return settings

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    def _read(self) -> tuple[bytes, bytes, bytes]:
        return tuple(pathlib.Path(p).read_bytes() for p in (self.key_file, self.cert_file, self.ca_file))  # type: ignore[return-value]

    def server_credentials(self) -> grpc.ServerCredentials:
        key, cert, ca = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        key, cert, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
