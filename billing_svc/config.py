"""billing_svc's settings, read once from the environment."""

from __future__ import annotations

from dataclasses import dataclass

from cloudach import defaults as d
from cloudach.config import from_env, setting



@dataclass(frozen=True)
class BillingConfig:
    listen_address: str = setting(d.address(d.BILLING_PORT), "CLOUDACH_BILLING_LISTEN")
    #: Prometheus metrics on 127.0.0.1:this port (0: a free port; -1: not served)
    metrics_port: int = setting(d.BILLING_METRICS_PORT, "CLOUDACH_BILLING_METRICS_PORT")
    #: sqlite:///path (the default, a file in the data directory) or postgresql://...
    database_url: str = setting(f"sqlite:///{d.DATA_DIR}/{d.BILLING_DATABASE}", "CLOUDACH_BILLING_DATABASE_URL")
    #: auth_svc, whose published keys verify callers' tokens
    auth_target: str = setting(d.address(d.AUTH_PORT), "CLOUDACH_AUTH_TARGET")
    #: prices per model (TOML)
    prices_file: str = setting(d.PRICES_FILE, "CLOUDACH_BILLING_PRICES_FILE")
    #: a request only inference_svc reported enters the ledger once its reports are this old
    #: (the edge's record of it, normally there within a second, has had time to come)
    reconcile_after_s: float = setting(60.0, "CLOUDACH_BILLING_RECONCILE_AFTER_S")
    #: how often the reports are looked at
    reconcile_every_s: float = setting(5.0, "CLOUDACH_BILLING_RECONCILE_EVERY_S")
    shutdown_grace_s: float = setting(5.0, "CLOUDACH_BILLING_SHUTDOWN_GRACE_S")

    @classmethod
    def from_env(cls) -> BillingConfig:
        return from_env(cls)
