"""auth_svc's settings, read once from the environment."""

from __future__ import annotations

from dataclasses import dataclass

from cloudach import defaults as d
from cloudach.config import from_env, setting


@dataclass(frozen=True)
class AuthConfig:
    listen_address: str = setting(d.address(d.AUTH_PORT), "CLOUDACH_AUTH_LISTEN")
    #: Prometheus metrics on 127.0.0.1:this port (0: a free port; -1: not served)
    metrics_port: int = setting(d.AUTH_METRICS_PORT, "CLOUDACH_AUTH_METRICS_PORT")
    #: sqlite:///path (the default, a file in the data directory) or postgresql://...
    database_url: str = setting(f"sqlite:///{d.DATA_DIR}/{d.AUTH_DATABASE}", "CLOUDACH_AUTH_DATABASE_URL")
    #: Ed25519 private key (PEM) signing internal tokens; made, mode 600, when missing
    signing_key_file: str = setting(f"{d.DATA_DIR}/{d.AUTH_SIGNING_KEY}", "CLOUDACH_AUTH_SIGNING_KEY_FILE")
    #: public keys (PEM files, comma-separated) still published after a rotation
    previous_public_key_files: tuple[str, ...] = setting((), "CLOUDACH_AUTH_PREVIOUS_PUBLIC_KEYS")
    #: lifetime of an internal token
    token_ttl_s: float = setting(300.0, "CLOUDACH_AUTH_TOKEN_TTL_S")
    #: a key file to import (or create) as an admin key at start: the local stack's dev key
    bootstrap_admin_key_file: str = setting("", "CLOUDACH_AUTH_BOOTSTRAP_ADMIN_KEY_FILE")
    #: key files (comma-separated) to import (or create) as service keys at start: the local
    #: stack's identities of the edge and inference_svc, which report usage
    bootstrap_service_key_files: tuple[str, ...] = setting((), "CLOUDACH_AUTH_BOOTSTRAP_SERVICE_KEY_FILES")
    shutdown_grace_s: float = setting(5.0, "CLOUDACH_AUTH_SHUTDOWN_GRACE_S")

    @classmethod
    def from_env(cls) -> AuthConfig:
        return from_env(cls)
