"""Where the services listen and keep their state unless told otherwise, declared once.

Every service's settings, the `cloudach` command and the launcher take their defaults from here,
so a port or a path changes in one place.
"""

from __future__ import annotations

import pathlib

HOST = "127.0.0.1"

EDGE_PORT = 8080
INFERENCE_PORT = 50051
AUTH_PORT = 50052
BILLING_PORT = 50053
#: Prometheus metrics of each service, on ports of their own (never the public API's)
EDGE_METRICS_PORT = 9100
INFERENCE_METRICS_PORT = 9101
AUTH_METRICS_PORT = 9102
BILLING_METRICS_PORT = 9103

#: the local stack's state (what `make run` keeps between runs), relative to where it runs
STATE_DIR = ".cloudach"
DATA_DIR = f"{STATE_DIR}/data"
#: the price list billing_svc prices the ledger with and the edge holds budgets at
PRICES_FILE = str(pathlib.Path(__file__).resolve().parent.parent / "deploy" / "billing" / "prices.toml")
DEV_API_KEY_FILE = f"{STATE_DIR}/dev-api-key"
AUTH_DATABASE = "auth.db"
AUTH_SIGNING_KEY = "auth-signing-key.pem"
BILLING_DATABASE = "billing.db"
EDGE_OUTBOX = "edge-outbox.db"
INFERENCE_OUTBOX = "inference-outbox.db"


def address(port: int, host: str = HOST) -> str:
    """host:port, as gRPC targets and listen addresses are written."""
    return f"{host}:{port}"
