"""What the commands that call the services share: the key they call with, its token, tables."""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

from cloudach.auth.v1 import auth_pb2
from cloudach.auth.v1.auth_pb2_grpc import AuthServiceStub
from tools.settings import ClientSettings

Metadata = tuple[tuple[str, str], ...]


def api_key(client: ClientSettings, key_file: pathlib.Path) -> str:
    """CLOUDACH_API_KEY, else the key in key_file; exits with a clear line when there is neither."""
    if client.api_key:
        return client.api_key
    try:
        return key_file.read_text().strip()
    except OSError:
        sys.exit(f"no API key: set CLOUDACH_API_KEY or create {key_file}")


async def token_metadata(auth: AuthServiceStub, key: str, admin: bool = False) -> Metadata:
    """The key exchanged with auth_svc for an internal token, as call metadata: its admin token
    (the admin RPCs), else its token for reading usage."""
    purpose = auth_pb2.PURPOSE_ADMIN if admin else auth_pb2.PURPOSE_API
    reply = await auth.Authenticate(auth_pb2.AuthenticateRequest(api_key=key, purpose=purpose), timeout=10)
    return (("authorization", f"Bearer {reply.token if admin else reply.usage_token}"),)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, each as wide as its widest cell."""
    lines = [tuple(header), *(tuple(str(v) for v in row) for row in rows)]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)
