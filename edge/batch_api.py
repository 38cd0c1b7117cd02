"""OpenAI's Files API (for batch input and output) and Batch API, as the official SDKs call them:
POST /v1/files, GET /v1/files/{id}, GET /v1/files/{id}/content, POST /v1/batches,
GET /v1/batches/{id}, GET /v1/batches, POST /v1/batches/{id}/cancel. A key sees its
organization's files and batches; the batch runs later (edge.batch_runner), as the key that made it.

A batch input file is checked whole at upload: every line a JSON object with a unique `custom_id`,
`method` POST, a `url` of an endpoint batches run and a `body` object, within the size and line
limits; the first line that is not is a 400 naming `file` and the line. A line whose url is not
the batch's endpoint, or whose body the endpoint refuses, becomes that line's entry in the
batch's error file; the others run.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from edge.batch_store import BatchStore, FileInfo
from edge.errors import ApiError, bad_request
from edge.http import check_values, no_constants, query_integer, read_json_object
from edge.state import PRINCIPAL, STATE

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
WINDOWS = {"24h": 86_400}
PURPOSES = ("batch", "batch_output")
MAX_CUSTOM_ID_CHARS = 512
MAX_METADATA = (16, 64, 512)  # pairs, key characters, value characters


def _store(request: web.Request) -> BatchStore:
    store = request.app[STATE].batches
    if store is None:
        raise ApiError(404, f"Invalid URL ({request.method} {request.path})")
    return store


def check_jsonl(data: bytes, max_lines: int, max_line_bytes: int) -> int:
    """The number of requests in a batch input file, or a 400 for its first bad line."""
    seen: set[str] = set()
    count = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue

        def bad(why: str, code: str = "invalid_file") -> ApiError:
            return bad_request(f"Line {number} of the file {why}.", param="file", code=code)

        if len(raw) > max_line_bytes:
            raise bad(f"is {len(raw)} bytes, over the limit of {max_line_bytes}", "line_too_large")
        try:
            line = json.loads(raw, parse_constant=no_constants)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise bad("is not valid JSON", "invalid_json_line") from None
        if not isinstance(line, dict):
            raise bad("is not a JSON object", "invalid_json_line")
        try:
            check_values(line)  # what an HTTP request's body may not hold, a line may not either
        except ApiError as refused:
            raise bad(f"is refused: {refused.message}", "invalid_json_line") from None
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
            raise bad(f"needs a custom_id: a string of 1 to {MAX_CUSTOM_ID_CHARS} characters", "invalid_custom_id")
        if custom_id in seen:
            raise bad(f"repeats the custom_id {json.dumps(custom_id)}: each must be unique", "duplicate_custom_id")
        seen.add(custom_id)
        if line.get("method") != "POST":
            raise bad("needs method POST", "invalid_method")
        if line.get("url") not in ENDPOINTS:
            raise bad(f"needs a url of {' or '.join(ENDPOINTS)}", "invalid_url")
        if not isinstance(line.get("body"), dict):
            raise bad("needs a body: a JSON object", "invalid_body")
        count += 1
        if count > max_lines:
            raise bad_request(f"The file has more than {max_lines} requests.", param="file", code="too_many_lines")
    if not count:
        raise bad_request("The file has no requests.", param="file", code="empty_file")
    return count


#: a form field other than the file (purpose), at most
MAX_FIELD_BYTES = 4096


async def _read_upload(request: web.Request, max_bytes: int) -> tuple[dict[str, str], tuple[str, bytes] | None]:
    """The multipart form's text fields, and its file (name, bytes): one file, the whole form
    within max_bytes and a field's size; a form that does not parse is a 400."""
    if request.content_type != "multipart/form-data":
        raise ApiError(415, f"Invalid content type: {request.content_type or 'none'}. Expected 'multipart/form-data'.",
                       code="unsupported_media_type")
    fields, upload, total = {}, None, 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise bad_request("Invalid form: a part may not be a multipart of its own.", param="file")
            is_file = part.name == "file" and part.filename is not None
            if is_file and upload is not None:
                raise bad_request("Invalid form: one file at a time.", param="file")
            limit, chunks, size = (max_bytes if is_file else MAX_FIELD_BYTES), [], 0
            while chunk := await part.read_chunk(65_536):
                size += len(chunk)
                total += len(chunk)
                if size > limit or total > max_bytes + MAX_FIELD_BYTES * 4:
                    what = f"The file is over the limit of {max_bytes} bytes." if is_file else \
                        f"The form field '{part.name}' is over the limit of {MAX_FIELD_BYTES} bytes."
                    raise ApiError(413, what, param="file" if is_file else part.name, code="file_too_large")
                chunks.append(chunk)
            data = b"".join(chunks)
            if is_file:
                upload = (part.filename, data)
            elif part.name:
                fields[part.name] = data.decode(errors="replace")
    except (KeyError, ValueError, AssertionError, UnicodeError, RuntimeError, HttpProcessingError) as error:
        raise bad_request(f"Invalid multipart form: {type(error).__name__}.", param="file") from None
    return fields, upload


async def create_file(request: web.Request) -> web.Response:
    store, config, principal = _store(request), request.app[STATE].config, request[PRINCIPAL]
    fields, upload = await _read_upload(request, config.max_file_bytes)
    if fields.get("purpose") != "batch":
        raise bad_request("Invalid 'purpose': this API stores batch input files ('batch').", param="purpose",
                          code="invalid_value")
    if upload is None:
        raise bad_request("Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
    filename, data = upload
    # megabytes of JSON: parsed off the event loop
    await asyncio.to_thread(check_jsonl, data, config.max_batch_lines, config.max_batch_line_bytes)
    info = await store.add_file(principal.organization, principal.key_id, "batch", filename[:255], data)
    return web.json_response(info.json())


async def _file(request: web.Request) -> FileInfo:
    info = await _store(request).file(request[PRINCIPAL].organization, request.match_info["file_id"])
    if info is None:
        raise ApiError(404, f"No such File object: {request.match_info['file_id']}", param="id")
    return info


async def retrieve_file(request: web.Request) -> web.Response:
    return web.json_response((await _file(request)).json())


async def file_content(request: web.Request) -> web.Response:
    info = await _file(request)
    return web.Response(body=await _store(request).files.get(info.id), content_type="application/octet-stream")


def _metadata(value) -> dict:
    pairs, key_chars, value_chars = MAX_METADATA
    if value is None:
        return {}
    if (not isinstance(value, dict) or len(value) > pairs
            or any(not isinstance(k, str) or len(k) > key_chars or not isinstance(v, str) or len(v) > value_chars
                   for k, v in value.items())):
        raise bad_request(f"Invalid 'metadata': at most {pairs} pairs of strings, keys up to {key_chars} and values "
                          f"up to {value_chars} characters.", param="metadata", code="invalid_value")
    return value


async def create_batch(request: web.Request) -> web.Response:
    store, principal = _store(request), request[PRINCIPAL]
    body = await read_json_object(request)
    if body.get("endpoint") not in ENDPOINTS:
        raise bad_request(f"Invalid 'endpoint': batches run {' and '.join(ENDPOINTS)}.", param="endpoint",
                          code="invalid_value")
    if body.get("completion_window") not in WINDOWS:
        raise bad_request("Invalid 'completion_window': it must be '24h'.", param="completion_window",
                          code="invalid_value")
    file_id = body.get("input_file_id")
    info = await store.file(principal.organization, file_id) if isinstance(file_id, str) else None
    if info is None or info.purpose != "batch":
        raise bad_request(f"Invalid 'input_file_id': no batch input file {json.dumps(file_id)}.",
                          param="input_file_id", code="invalid_value")
    batch = await store.add_batch(principal.organization, principal.key_id, body["endpoint"], info.id,
                                  WINDOWS[body["completion_window"]], _metadata(body.get("metadata")))
    request.app[STATE].batch_wake.set()
    return web.json_response(batch.json())


async def retrieve_batch(request: web.Request) -> web.Response:
    batch = await _store(request).batch(request[PRINCIPAL].organization, request.match_info["batch_id"])
    if batch is None:
        raise ApiError(404, f"No such Batch object: {request.match_info['batch_id']}", param="id")
    return web.json_response(batch.json())


async def list_batches(request: web.Request) -> web.Response:
    limit = query_integer(request, "limit", 1, 100, default=20)
    batches, more = await _store(request).batches(request[PRINCIPAL].organization, limit, request.query.get("after"))
    data = [b.json() for b in batches]
    return web.json_response({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None, "has_more": more})


async def cancel_batch(request: web.Request) -> web.Response:
    batch = await _store(request).cancel(request[PRINCIPAL].organization, request.match_info["batch_id"])
    if batch is None:
        raise ApiError(404, f"No such Batch object: {request.match_info['batch_id']}", param="id")
    request.app[STATE].batch_wake.set()
    return web.json_response(batch.json())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/files", create_file)
    app.router.add_get("/v1/files/{file_id}", retrieve_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", retrieve_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
