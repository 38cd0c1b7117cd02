"""OpenAI's error envelope, and the one mapping from domain errors (raised here, or returned by a
service over gRPC) to HTTP statuses. Routes raise; the error middleware (middleware.py) answers."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping

import grpc

from cloudach import errors as domain
from cloudach.rpc.errors import error_from_rpc

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


def retry_headers(wait_s: float) -> dict[str, str]:
    """The waits the official SDKs honour: Retry-After in whole seconds, retry-after-ms exactly."""
    return {"Retry-After": str(math.ceil(wait_s)), "retry-after-ms": str(math.ceil(wait_s * 1000))}


def overloaded(message: str, retry_after_s: float = 1) -> ApiError:
    """503: at capacity right now; retrying shortly helps."""
    return ApiError(503, message, type="server_error", code="server_overloaded", headers=retry_headers(retry_after_s))


def unavailable(message: str) -> ApiError:
    """503: a service behind the edge cannot answer right now; retrying shortly helps."""
    return ApiError(503, message, type="server_error", code="service_unavailable", headers=retry_headers(1))


#: inference_svc's field paths, as the public API names them.
_PUBLIC_PARAMS = {
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.presence_penalty": "presence_penalty",
    "sampling.frequency_penalty": "frequency_penalty",
    "sampling.logit_bias": "logit_bias",
    "sampling.seed": "seed",
    "stopping.stop_sequences": "stop",
    "messages": "messages",
    "n": "n",
    "num_return_sequences": "n",
    "top_logprobs": "top_logprobs",
    "prompt": "prompt",
}


def public_param(param: str | None, max_tokens_name: str) -> str | None:
    if param is None:
        return None
    if param == "stopping.max_new_tokens":
        return max_tokens_name
    if param.startswith("stopping.stop_sequences"):
        return "stop"
    if param.startswith(("messages", "tools", "tool_choice")):
        return param
    if param.startswith("guide"):
        return "response_format"
    return _PUBLIC_PARAMS.get(param)


def from_failure(error: BaseException, max_tokens_name: str = "max_tokens") -> ApiError | None:
    """The HTTP error for a failed gRPC call or a domain error; None for anything else."""
    if isinstance(error, grpc.aio.AioRpcError):
        error = error_from_rpc(error)
    if isinstance(error, ApiError):
        return error
    if isinstance(error, domain.CloudachError):
        return from_domain(error, max_tokens_name)
    return None


def from_domain(error: domain.CloudachError, max_tokens_name: str = "max_tokens") -> ApiError:
    """The HTTP error a caller sees for a domain error."""
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
        return unavailable("The model is temporarily unavailable. Please retry shortly.")
    if isinstance(error, domain.DeadlineExceeded):
        return ApiError(504, "The request did not complete within its deadline.", type="server_error", code="timeout")
    # The caller sees a generic message; the operator needs the cause.
    log.warning("internal error answered with 500: %s: %s", type(error).__name__, error.message)
    return ApiError(500, "The server had an error while processing your request.", type="server_error")
