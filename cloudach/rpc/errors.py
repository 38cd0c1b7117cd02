"""The whole gRPC error policy: CloudachError <-> google.rpc.Status with its details.

Servers: ErrorInterceptor turns a CloudachError raised by any handler into its status code,
with the offending field in a BadRequest violation and the code in an ErrorInfo reason.
Clients: error_from_rpc() turns an AioRpcError back into the same CloudachError.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from cloudach.errors import BY_STATUS, CloudachError, Internal, Unavailable
from cloudach.rpc.wrap import wrap_handler

log = logging.getLogger(__name__)

ERROR_DOMAIN = "cloudach.com"
#: the reason (ErrorInfo) of a call a stopping server refuses: the caller should go elsewhere
DRAINING = "draining"


def to_status(error: CloudachError) -> grpc.Status:
    status = status_pb2.Status(code=error.status.value[0], message=error.message)
    if error.param:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.param, description=error.message)
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    if error.code:
        status.details.add().Pack(error_details_pb2.ErrorInfo(reason=error.code, domain=ERROR_DOMAIN))
    return rpc_status.to_status(status)


def error_from_rpc(error: grpc.aio.AioRpcError) -> CloudachError:
    """The CloudachError a server raised, rebuilt from the call's status and details."""
    return error_from_status(error.code(), error.details(), error.trailing_metadata())


async def error_from_call(call: grpc.aio.Call) -> CloudachError:
    """The same, for a call that ended with an error before any message."""
    return error_from_status(await call.code(), await call.details(), await call.trailing_metadata())


def error_from_status(status_code: grpc.StatusCode, details: str | None, trailing_metadata) -> CloudachError:
    param = code = None
    for key, value in trailing_metadata or ():
        if key != rpc_status.GRPC_DETAILS_METADATA_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                param = bad.field_violations[0].field if bad.field_violations else None
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                code = info.reason or None
    if status_code == grpc.StatusCode.CANCELLED:
        # Seen by a client, CANCELLED means the server side gave the call up (an overloaded gRPC
        # server cancels calls it could not take up in time): retryable, not an internal error.
        return Unavailable(details or "the upstream service cancelled the call")
    cls = BY_STATUS.get(status_code, Internal)
    return cls(details or status_code.name, param=param, code=code)


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    if not isinstance(error, CloudachError):
        # Unexpected: keep the traceback in our logs, tell the caller nothing internal.
        log.exception("unhandled error in gRPC handler", exc_info=error)
        error = Internal("internal error")
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


@contextlib.asynccontextmanager
async def _mapped(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as error:  # noqa: BLE001 - this is the one place errors are mapped
        await _abort(context, error)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps CloudachError (and anything unexpected) to gRPC status codes for every handler."""

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[override]
        return wrap_handler(await continuation(handler_call_details), _mapped)


__all__ = ["ErrorInterceptor", "error_from_call", "error_from_rpc", "error_from_status", "to_status"]
