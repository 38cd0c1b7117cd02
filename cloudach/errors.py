"""The one exception hierarchy of Cloudach's services.

Domain code raises these; one gRPC interceptor (cloudach.rpc.errors) turns them into status
codes, and the edge turns those into OpenAI's error envelope. Nothing else maps errors.
"""

from __future__ import annotations

import grpc


#: no model id is longer; a longer one is refused as unknown without looking it up
MAX_MODEL_ID_CHARS = 256


def shown(text: str, limit: int = 64) -> str:
    """Text a caller sent, quoted in an error message: cut to limit characters, so a message (and
    the gRPC trailer carrying it) stays small whatever was sent."""
    return text if len(text) <= limit else text[:limit] + "…"


def model_not_found(model: str) -> NotFound:
    return NotFound(f"The model `{shown(model)}` does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


class CloudachError(Exception):
    """An error a caller should see, with the field it concerns and a machine-readable code."""

    status = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidArgument(CloudachError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(CloudachError):
    status = grpc.StatusCode.NOT_FOUND


class Unauthenticated(CloudachError):
    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(CloudachError):
    status = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(CloudachError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(CloudachError):
    status = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(CloudachError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(CloudachError):
    status = grpc.StatusCode.INTERNAL


BY_STATUS: dict[grpc.StatusCode, type[CloudachError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument,
        NotFound,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Internal,
    )
}
