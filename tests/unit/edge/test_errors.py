"""The one mapping from a failure to OpenAI's error envelope and status."""

from __future__ import annotations

import grpc
import pytest

from cloudach import errors as domain
from cloudach.rpc.errors import to_status
from edge.errors import ApiError, from_failure, retry_headers


class _Failed(grpc.aio.AioRpcError):
    """A failed call as a client sees it, from the status a server's interceptor sends."""

    def __init__(self, error: domain.CloudachError) -> None:
        status = to_status(error)
        super().__init__(status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata), status.details)


@pytest.mark.parametrize("error, status, kind, code", [
    (domain.InvalidArgument("bad", param="sampling.temperature"), 400, "invalid_request_error", None),
    (domain.NotFound("no such model", code="model_not_found"), 404, "invalid_request_error", "model_not_found"),
    (domain.Unauthenticated("who"), 401, "invalid_request_error", "invalid_api_key"),
    (domain.PermissionDenied("no"), 403, "invalid_request_error", None),
    (domain.ResourceExhausted("full"), 503, "server_error", "server_overloaded"),
    (domain.Unavailable("down"), 503, "server_error", "service_unavailable"),
    (domain.DeadlineExceeded("slow"), 504, "server_error", "timeout"),
    (domain.Internal("oops"), 500, "server_error", None),
])
def test_a_services_error_reaches_the_caller_with_openais_status(error, status, kind, code):
    for failure in (error, _Failed(error)):  # raised here, or returned over gRPC
        answer = from_failure(failure)
        assert (answer.status, answer.type, answer.code) == (status, kind, code)
        assert set(answer.envelope()["error"]) == {"message", "type", "param", "code"}


def test_field_paths_become_the_public_parameter_names():
    assert from_failure(_Failed(domain.InvalidArgument("x", param="sampling.temperature"))).param == "temperature"
    assert from_failure(domain.InvalidArgument("x", param="stopping.max_new_tokens"), "max_completion_tokens").param \
        == "max_completion_tokens"
    assert from_failure(domain.InvalidArgument("x", param="stopping.stop_sequences[1]")).param == "stop"


def test_retryable_answers_say_how_long_to_wait():
    assert retry_headers(0.25) == {"Retry-After": "1", "retry-after-ms": "250"}
    assert retry_headers(2) == {"Retry-After": "2", "retry-after-ms": "2000"}
    for error in (domain.ResourceExhausted("full"), domain.Unavailable("down")):
        assert from_failure(error).headers == retry_headers(1)
    assert from_failure(domain.PermissionDenied("no")).headers == {"x-should-retry": "false"}


def test_an_api_error_passes_through_and_anything_else_is_not_mapped():
    mine = ApiError(418, "teapot")
    assert from_failure(mine) is mine
    assert from_failure(ValueError("a bug")) is None
