"""OpenAI's error envelope, and the one mapping from domain errors to HTTP statuses."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from cloudach import errors as domain

log = logging.getLogger("edge.errors")


class ApiError(Exception):
    """An error response: {"error": {"message", "type", "param", "code"}} with its status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def envelope(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return json.dumps(self.envelope()).encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def overloaded(message: str, retry_after_s: int = 1) -> ApiError:
    return ApiError(503, message, type="server_error", code="server_overloaded",
                    headers={"Retry-After": str(retry_after_s), "retry-after-ms": str(retry_after_s * 1000)})


#: inference_svc's field paths, as the public API names them.
_PUBLIC_PARAMS = {
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.presence_penalty": "presence_penalty",
    "sampling.frequency_penalty": "frequency_penalty",
    "sampling.seed": "seed",
    "stopping.stop_sequences": "stop",
    "messages": "messages",
}


def public_param(param: str | None, max_tokens_name: str) -> str | None:
    if param is None:
        return None
    if param == "stopping.max_new_tokens":
        return max_tokens_name
    if param.startswith("stopping.stop_sequences"):
        return "stop"
    if param.startswith("messages"):
        return param
    return _PUBLIC_PARAMS.get(param)


def from_domain(error: domain.CloudachError, max_tokens_name: str = "max_tokens") -> ApiError:
    """The HTTP error a caller sees for a domain error (raised here or returned by a service)."""
    param = public_param(error.param, max_tokens_name)
    if isinstance(error, domain.InvalidArgument):
        return ApiError(400, error.message, param=param, code=error.code)
    if isinstance(error, domain.NotFound):
        return ApiError(404, error.message, param=None, code=error.code)
    if isinstance(error, domain.Unauthenticated):
        return ApiError(401, error.message, code=error.code or "invalid_api_key")
    if isinstance(error, domain.PermissionDenied):
        return ApiError(403, error.message, code=error.code, headers={"x-should-retry": "false"})
    if isinstance(error, domain.ResourceExhausted):
        return overloaded(error.message)
    if isinstance(error, domain.Unavailable):
        return ApiError(503, "The model is temporarily unavailable. Please retry shortly.",
                        type="server_error", code="service_unavailable",
                        headers={"Retry-After": "1", "retry-after-ms": "1000"})
    if isinstance(error, domain.DeadlineExceeded):
        return ApiError(504, "The request did not complete within its deadline.", type="server_error", code="timeout")
    # The caller sees a generic message; the operator needs the cause.
    log.warning("internal error answered with 500: %s: %s", type(error).__name__, error.message)
    return ApiError(500, "The server had an error while processing your request.", type="server_error")
