"""Statuses a client sees from an upstream gRPC service, as the errors callers get."""

from __future__ import annotations

import grpc

from cloudach.errors import Internal, Unavailable
from cloudach.rpc.errors import error_from_status
from edge.errors import from_domain


def test_a_call_the_server_cancelled_is_a_retryable_503_not_a_500():
    # an overloaded gRPC server cancels calls it could not take up in time, with no details
    error = error_from_status(grpc.StatusCode.CANCELLED, None, ())
    assert isinstance(error, Unavailable)
    reply = from_domain(error)
    assert reply.status == 503 and reply.headers["Retry-After"] == "1"


def test_an_unknown_status_is_still_an_internal_error():
    assert isinstance(error_from_status(grpc.StatusCode.DATA_LOSS, "boom", ()), Internal)
    assert from_domain(error_from_status(grpc.StatusCode.DATA_LOSS, "boom", ())).status == 500
