"""Runs batch jobs: each edge replica runs one runner, which takes the lease of one active batch at
a time (edge.batch_store) and moves it on: validating (its requests become rows) → in_progress →
finalizing (output and error files written) → completed; expired past its window; cancelling →
cancelled when asked; failed when the batch itself cannot be run (its runner failed on it
MAX_BATCH_FAILURES times).

Each request runs through the same path as an HTTP request (edge.serving.run: validation, the
key's allowed models, its budget, inference_svc, billing at the batch rate), as the key that made
the batch (auth_svc issues its tokens to our service identity: IssueKeyToken; a revoked key's
batch fails what remains). Low priority on spare capacity: at most `batch_concurrency` requests
at once per edge, none started while this edge has `batch_pause_above` interactive requests in
flight. A request's id is fixed by its batch and line, so one run again after a restart is
billed once (billing keeps the run that completed). A failure that waiting may cure (a 5xx: a
service restarting: 502, 503, 504) is retried after a growing pause until the batch's window ends,
and new requests wait out the pause too; another 5xx (a 500) is retried MAX_ATTEMPTS times in all,
then stored as the line's error. Requests running when the batch is cancelled, expires or the edge stops are
let finish, the lease renewed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
import uuid

import grpc

from cloudach.auth.v1 import auth_pb2
from edge.auth import principal_from
from edge.batch_api import ENDPOINTS
from edge.batch_store import Batch, BatchStore, Item, LeaseLost
from edge.chat import parse_chat_request
from edge.completions import parse_completion_request
from cloudach.errors import PermissionDenied
from cloudach.rpc.errors import error_from_rpc
from edge.errors import ApiError, from_failure

log = logging.getLogger(__name__)
PARSERS = dict(zip(ENDPOINTS, (parse_chat_request, parse_completion_request)))
MAX_ATTEMPTS = 5
#: failures waiting cures (a service restarting, at capacity): retried until the window ends
PASSING = (502, 503, 504)
#: a batch whose input cannot be read or parsed this many times is failed
MAX_BATCH_FAILURES = 3
_EXPIRED = {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}
_CANCELLED = {"code": "batch_cancelled", "message": "This request was not executed: the batch was cancelled."}


def _line_id(batch_id: str, line: int) -> str:
    return hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:24]


def _with_id(job, request_id: str):
    for generate in job.generates:
        generate.usage_id = request_id
    return dataclasses.replace(job, id=request_id)


def _result(response: dict | None = None, error: dict | None = None) -> dict:
    """A request's line of the output or error file (its id and custom_id go in at the end)."""
    return {"response": response, "error": error}


class BatchRunner:
    def __init__(self, state, store: BatchStore, identity, auth_stub, lease_s: float = 15.0,
                 concurrency: int = 1, pause_above: int = 8, poll_s: float = 1.0, retry_s: float = 2.0) -> None:
        self._state, self._store, self._identity, self._auth = state, store, identity, auth_stub
        self._lease_s, self._concurrency, self._pause_above = lease_s, concurrency, pause_above
        self._poll_s, self._retry_s = poll_s, retry_s
        self._owner = f"edge-{uuid.uuid4().hex[:12]}"
        self._principals: dict[str, tuple[float, object]] = {}
        self._running = 0
        #: no new request starts before this (time.time()): the last one met a passing failure
        self._pause_until = 0.0
        #: set at shutdown: no new request starts, the running ones finish (their bills whole)
        self.stopping = asyncio.Event()

    def stop(self) -> None:
        """No request starts from now; run_forever returns once the running ones have finished."""
        self.stopping.set()
        self._state.batch_wake.set()

    async def run_forever(self) -> None:
        wake = self._state.batch_wake
        while not self.stopping.is_set():
            batch_id = None
            try:
                batch_id = await self._store.claim(self._owner, self._lease_s)
                if batch_id is not None:
                    try:
                        await self._work(batch_id)
                    finally:
                        with contextlib.suppress(Exception):  # an unreleased lease expires on its own
                            await self._store.release(batch_id, self._owner)
                    continue
            except asyncio.CancelledError:
                raise
            except LeaseLost:
                continue  # another runner has it, or it was cancelled meanwhile: read it again
            except Exception:  # noqa: BLE001 - the runner never stops (its database away, say): the batch waits
                log.exception("batch runner failed on %s; retrying", batch_id)
            wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_s):
                    await wake.wait()

    async def _work(self, batch_id: str) -> None:
        batch = await self._store.batch(None, batch_id)
        if batch.status == "validating":
            batch = await self._validate(batch)
        if batch.status == "in_progress":
            batch = await self._run_items(batch)
        if batch.status in ("finalizing", "cancelling"):
            await self._finalize(batch)

    async def _validate(self, batch: Batch) -> Batch:
        try:
            data = await self._store.files.get(batch.input_file_id)
            items, wrong = [], []
            number = 0
            for raw in data.split(b"\n"):
                if not raw.strip():
                    continue
                number += 1
                line = json.loads(raw)  # checked whole at upload
                right = line["url"] == batch.endpoint
                items.append(Item(number, line["custom_id"], line["body"] if right else {}))
                if not right:
                    wrong.append((number, line["url"]))
        except Exception as error:  # noqa: BLE001 - its input cannot be read: a few tries, then the batch fails
            log.exception("batch %s: its input file could not be read", batch.id)
            if await self._store.failed_once(batch.id) >= MAX_BATCH_FAILURES:
                await self._store.fail_batch(batch.id, [{"code": "invalid_input_file", "line": None, "param": None,
                                                         "message": f"The input file could not be read: "
                                                                    f"{type(error).__name__}"}])
            raise LeaseLost(batch.id) from None  # read it again (failed, or to try once more)
        for start in range(0, len(items), 500):  # in chunks, the lease renewed between them
            await self._store.add_items(batch.id, items[start:start + 500])
            await self._renew(batch)
        for number, url in wrong:
            await self._store.finish_item(batch.id, number, False, _result(error={
                "code": "invalid_url", "message": f"The url {url} is not the batch's endpoint {batch.endpoint}."}))
        await self._store.move(batch.id, self._owner, ("validating",), "in_progress", "in_progress_at")
        return await self._store.batch(None, batch.id)

    async def _renew(self, batch: Batch) -> None:
        if not await self._store.renew(batch.id, self._owner, self._lease_s):
            raise LeaseLost(batch.id)

    async def _drain(self, batch: Batch, running: set[asyncio.Task]) -> None:
        """Lets the running requests finish, renewing the lease meanwhile."""
        while running:
            done, _ = await asyncio.wait(running, timeout=self._lease_s / 3)
            running.difference_update(done)
            await self._renew(batch)

    async def _run_items(self, batch: Batch) -> Batch:
        running: set[asyncio.Task] = set()
        try:
            while True:
                await self._renew(batch)
                status, expires_at = await self._store.status(batch.id)
                if status != "in_progress" or self.stopping.is_set():
                    await self._drain(batch, running)
                    return await self._store.batch(None, batch.id)  # cancelling, or this edge stops
                if time.time() >= expires_at:
                    await self._drain(batch, running)
                    await self._store.fail_pending(batch.id, _result(error=_EXPIRED))
                    await self._store.move(batch.id, self._owner, ("in_progress",), "finalizing", "finalizing_at",
                                           expired_at=int(time.time()))
                    return await self._store.batch(None, batch.id)
                busy = {task.line for task in running}  # type: ignore[attr-defined]
                room = self._concurrency - len(running)
                interactive = self._state.admission.active - self._running
                pending = await self._store.pending(batch.id, room, busy) if room > 0 else []
                if not running and not pending and not await self._store.has_pending(batch.id):
                    await self._store.move(batch.id, self._owner, ("in_progress",), "finalizing", "finalizing_at")
                    return await self._store.batch(None, batch.id)
                if interactive < self._pause_above and time.time() >= self._pause_until:
                    for item in pending:
                        task = asyncio.create_task(self._run_item(batch, item))
                        task.line = item.line  # type: ignore[attr-defined]
                        running.add(task)
                if running:
                    done, _ = await asyncio.wait(running, timeout=self._lease_s / 3,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    running.difference_update(done)
                    for task in done:
                        if not task.cancelled() and task.exception() is not None:  # its result not stored: it runs again
                            log.error("batch %s: a request's run failed", batch.id, exc_info=task.exception())
                else:
                    await asyncio.sleep(0.2)  # interactive traffic first, or requests waiting out a retry
        finally:
            for task in running:  # only when leaving through an error: the lease is lost
                task.cancel()

    async def _principal(self, key_id: str):
        cached = self._principals.get(key_id)
        if cached is not None and cached[0] > time.time():
            return cached[1]
        reply = await self._auth.IssueKeyToken(auth_pb2.IssueKeyTokenRequest(key_id=key_id),
                                               metadata=await self._identity.metadata(), timeout=10)
        principal = principal_from(reply)
        self._principals[key_id] = (reply.token_expires_at.seconds - 60, principal)
        return principal

    async def _run_item(self, batch: Batch, item: Item) -> None:
        """Runs one request and stores its result (or, for a failure waiting may cure, its retry)."""
        from edge.serving import run

        request_id = f"{'chatcmpl' if batch.endpoint == ENDPOINTS[0] else 'cmpl'}-{_line_id(batch.id, item.line)}"
        self._running += 1
        max_tokens_name = "max_tokens"
        try:
            try:
                principal = await self._principal(batch.key_id)
            except grpc.aio.AioRpcError as failure:
                refusal = error_from_rpc(failure)
                if failure.code() == grpc.StatusCode.NOT_FOUND or refusal.code == "invalid_api_key":
                    raise ApiError(401, "The API key that created this batch was revoked.",
                                   code="invalid_api_key") from None
                # our own identity refused, auth_svc away: nothing to do with the line; later
                raise ApiError(503, f"auth_svc did not issue the key's tokens: {refusal.message}",
                               type="server_error") from None
            except PermissionDenied as refused:  # the service key is not one (ServiceToken says so)
                raise ApiError(503, refused.message, type="server_error") from None
            if item.body.get("stream"):
                raise ApiError(400, "Batch requests are answered whole: 'stream' must be false.", param="stream",
                               code="invalid_value")
            job = PARSERS[batch.endpoint](item.body)
            max_tokens_name = job.max_tokens_name
            response = await run(self._state, principal, _with_id(job, request_id), batch_id=batch.id)
            await self._store.finish_item(batch.id, item.line, True, _result(
                {"status_code": 200, "request_id": request_id, "body": json.loads(response.body)}))
        except asyncio.CancelledError:
            raise
        except Exception as failure:  # noqa: BLE001 - each request's failure is its own
            error = from_failure(failure, max_tokens_name)
            if error is None:
                log.exception("batch %s line %d failed", batch.id, item.line)
                error = ApiError(500, "The server had an error while processing your request.", type="server_error")
            await self._store_failure(batch, item, request_id, error)
        finally:
            self._running -= 1

    async def _store_failure(self, batch: Batch, item: Item, request_id: str, error: ApiError) -> None:
        if error.status in PASSING or (error.status >= 500 and item.attempts + 1 < MAX_ATTEMPTS):
            pause = min(60.0, self._retry_s * 2 ** min(item.attempts, 10))
            log.warning("batch %s line %d: %d %s; retried in %.0fs", batch.id, item.line, error.status, error.message,
                        pause)
            await self._store.retry_later(batch.id, item.line, pause)
            self._pause_until = max(self._pause_until, time.time() + pause)  # the others wait too
            return
        await self._store.finish_item(batch.id, item.line, False, _result(
            {"status_code": error.status, "request_id": request_id, "body": error.envelope()}))

    async def _finalize(self, batch: Batch) -> None:
        if batch.status == "cancelling":
            await self._store.fail_pending(batch.id, _result(error=_CANCELLED))
        output, errors = [], []
        for line, custom_id, status, result in await self._store.results(batch.id):
            entry = {"id": f"batch_req_{_line_id(batch.id, line)}", "custom_id": custom_id, **json.loads(result)}
            (output if status == "done" else errors).append(json.dumps(entry, ensure_ascii=False))
        files = {}
        for column, lines, kind in (("output_file_id", output, "output"), ("error_file_id", errors, "error")):
            if lines:
                await self._renew(batch)
                info = await self._store.add_file(batch.organization, batch.key_id, "batch_output",
                                                  f"{batch.id}_{kind}.jsonl", ("\n".join(lines) + "\n").encode())
                files[column] = info.id
        await self._renew(batch)
        if batch.status == "cancelling":
            await self._store.move(batch.id, self._owner, ("cancelling",), "cancelled", "cancelled_at", **files)
        elif batch.times.get("expired_at"):
            await self._store.move(batch.id, self._owner, ("finalizing",), "expired", None, **files)
        else:
            await self._store.move(batch.id, self._owner, ("finalizing", ), "completed", "completed_at", **files)
        log.info("batch %s finished (%s): %d answered, %d failed", batch.id, batch.status, len(output), len(errors))
