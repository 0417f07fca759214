"""Reading the `model` a request names, so it can be routed to the consumer that serves it, and
receiving a job's body whole before the job takes the lease.

JSON bodies (Ollama's API, OpenAI's chat, completions, embeddings, speech and image routes) are
small: they are read whole, bounded by `max_body_mib`. Audio uploads are multipart forms that
may be large: only their head is read to find the model, up to the end of the `model` form
field, into a `SpooledBody` (memory up to 1 MiB, then a temporary file); the
rest of the upload follows it into the same file before the job starts (`receive_whole`), so a
client that sends slowly holds its own connection, never the GPU. Every read waits at most
`client_idle_s` for the client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.relay.proxy import Body, check_declared_size, client_idle_s
from mgpumanager.relay.spool import (
    CHUNK_BYTES,
    SpooledBody,
    read_client,
    receive_body,
    spooled_file,
    too_large,
)

MAX_FIELD_BYTES = 1024  # a model name; a longer `model` field is not one


@dataclass(frozen=True)
class Found:
    """What a request says about its model: `model` (None: it names none), `body` to send
    instead of the client's (None: stream the client's, unread), the decoded JSON object where
    the body was one, and where a multipart body's model value lies in its head (byte offsets).
    """

    model: str | None
    body: Body | None
    obj: dict[str, Any] | None = None
    span: tuple[int, int] | None = None

    def close(self) -> None:
        """Release a spooled body (its temporary file), once the request has been relayed."""
        if isinstance(self.body, SpooledBody):
            self.body.close()


async def read_body(request: web.Request, max_body_bytes: int, consumer: str | None) -> bytes:
    """The whole body, in memory, refused with payload_too_large past `max_body_bytes`."""
    check_declared_size(request, max_body_bytes, consumer)
    idle_s = client_idle_s(request)
    chunks: list[bytes] = []
    seen = 0
    while chunk := await read_client(request.content, idle_s, consumer):
        seen += len(chunk)
        if seen > max_body_bytes:
            raise too_large(max_body_bytes, consumer)
        chunks.append(chunk)
    return b"".join(chunks)


async def receive_whole(
    request: web.Request, body: Body | None, max_body_bytes: int, consumer: str
) -> Body | None:
    """A job's body, all of it here: `body` as a surface read it (bytes; a SpooledBody whose
    head was read, completed in place), else the client's whole body: bytes up to 1 MiB, past
    that a new SpooledBody (the caller closes it). None: the request has no body.

    The declared size is checked where reading starts: by the surface that read a body or its
    head (`read_body`, `find_model`), else here."""
    idle_s = client_idle_s(request)
    if isinstance(body, SpooledBody):
        await body.receive_rest(max_body_bytes, idle_s, consumer)
        return body
    if body is not None or not request.body_exists:
        return body
    check_declared_size(request, max_body_bytes, consumer)
    return await receive_body(request.content, max_body_bytes, idle_s, consumer)


def parse_json(body: bytes, what: str, consumer: str | None) -> Any:
    """`body` decoded as JSON, or a bad_request saying why. Deep nesting (RecursionError) and
    numbers too long to convert are malformed input too, never a traceback."""
    try:
        return json.loads(body)
    except RecursionError:
        raise BrokerError(
            ErrorCode.BAD_REQUEST, f"{what} is nested too deeply", consumer=consumer
        ) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an over-long integer
        raise BrokerError(
            ErrorCode.BAD_REQUEST, f"{what} is not JSON: {_short(exc)}", consumer=consumer
        ) from None


def encode_json(obj: Any, what: str, consumer: str | None) -> bytes:
    """`obj` encoded again (after a field was rewritten); the decoder and encoder count depth
    alike, but not to the frame, so a body at the edge is refused here too, never a crash."""
    try:
        return json.dumps(obj).encode()
    except RecursionError:
        raise BrokerError(
            ErrorCode.BAD_REQUEST, f"{what} is nested too deeply", consumer=consumer
        ) from None


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def is_multipart(request: web.Request) -> bool:
    return request.content_type.startswith("multipart/")


async def find_model(
    request: web.Request,
    max_body_bytes: int,
    *,
    fields: tuple[str, ...] = ("model",),
    strict: bool,
    consumer: str | None = None,
) -> Found:
    """The model named by the first of `fields` present. `strict`: a body that is not a JSON
    object (or a malformed form) is a bad_request; otherwise it is sent on unchanged and names
    no model (the consumer's own API answers it)."""
    if is_multipart(request):
        return await _multipart_model(request, max_body_bytes, fields[0], consumer)
    body = await read_body(request, max_body_bytes, consumer)
    try:
        obj = parse_json(body, "the body", consumer) if body.strip() else {}
    except BrokerError:
        if strict:
            raise
        return Found(None, body)
    if not isinstance(obj, dict):
        if strict:
            raise BrokerError(
                ErrorCode.BAD_REQUEST, "the body must be a JSON object", consumer=consumer
            )
        return Found(None, body)
    for field in fields:
        value = obj.get(field)
        if isinstance(value, str) and value:
            return Found(value, body, obj)
    return Found(None, body, obj)


def renamed(found: Found, field: str, target: str) -> Found:
    """`found` with its `field` set to `target` (an alias resolved to the name the upstream
    knows): in a JSON body, or in a multipart head (the form's `model` field)."""
    if found.obj is not None:
        if found.obj.get(field) == target:
            return found
        obj = {**found.obj, field: target}
        return Found(target, encode_json(obj, "the body", None), obj)
    body = found.body
    if isinstance(body, SpooledBody) and found.span is not None and found.model != target:
        start, end = found.span
        body.file.seek(start)
        if body.file.read(end - start).strip().decode("utf-8", "replace") != found.model:
            return found  # not where the scan said: leave the form as it came
        head = spooled_file()
        body.file.seek(0)
        head.write(body.file.read(start))
        head.write(target.encode())
        body.file.seek(end)
        while chunk := body.file.read(CHUNK_BYTES):
            head.write(chunk)
        body.close()
        return Found(target, SpooledBody(head, body.rest, exact=False))
    return found


async def _multipart_model(
    request: web.Request, max_body_bytes: int, field: str, consumer: str | None
) -> Found:
    check_declared_size(request, max_body_bytes, consumer)
    _, params = parse_options_header(request.headers.get("Content-Type"))
    boundary = params.get(b"boundary")
    if not boundary:
        raise BrokerError(
            ErrorCode.BAD_REQUEST, "multipart body without a boundary", consumer=consumer
        )
    scan = _FieldScan(field)
    try:
        parser = MultipartParser(boundary, scan.callbacks())
    except (FormParserError, ValueError) as exc:
        raise BrokerError(
            ErrorCode.BAD_REQUEST, f"malformed multipart body: {exc}", consumer=consumer
        ) from None
    head = spooled_file()
    idle_s = client_idle_s(request)
    try:
        while not scan.done:
            chunk = await read_client(request.content, idle_s, consumer)
            if not chunk:
                break
            if scan.offset + len(chunk) > max_body_bytes:
                raise too_large(max_body_bytes, consumer)
            head.write(chunk)
            parser.write(chunk)
            scan.offset += len(chunk)
    except FormParserError as exc:
        head.close()
        raise BrokerError(
            ErrorCode.BAD_REQUEST, f"malformed multipart body: {exc}", consumer=consumer
        ) from None
    except BaseException:
        head.close()
        raise
    span = scan.span if scan.value is not None else None
    return Found(scan.value, SpooledBody(head, request.content), span=span)


class _FieldScan:
    """Callbacks for python-multipart's push parser that catch one text field."""

    def __init__(self, field: str) -> None:
        self.field = field
        self.value: str | None = None
        self.done = False
        self.offset = 0  # bytes written to the parser before the current chunk
        self.span: tuple[int, int] | None = None  # the field's value, in the whole body
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._in_field = False
        self._data = bytearray()

    def callbacks(self) -> Any:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._disposition = b""
        self._in_field = False
        self._data.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._header_name).strip().lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._disposition)
        name = params.get(b"name", b"").decode("utf-8", "replace")
        self._in_field = name == self.field and b"filename" not in params

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_field and len(self._data) <= MAX_FIELD_BYTES:
            self._data += data[start:end]
            first = self.span[0] if self.span is not None else self.offset + start
            self.span = (first, self.offset + end)

    def _part_end(self) -> None:
        if self._in_field:
            text = self._data.decode("utf-8", "replace").strip()
            if text and len(self._data) <= MAX_FIELD_BYTES:
                self.value = text
            self.done = True
