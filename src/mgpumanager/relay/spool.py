"""Bodies held by the broker so that no client's pace reaches the GPU lease.

A job takes the lease only once its request body is all here: `SpooledBody` holds it, in memory
up to `SPOOL_MEMORY_BYTES` and in a temporary file past that, so memory stays bounded whatever
the upload's size (`max_body_mib` bounds the file). The answer goes the other way through an
`AnswerBuffer`: the upstream is read at its own pace into it (memory up to
`ANSWER_MEMORY_BYTES`, then a temporary file) while the client takes from it at its own, so
the lease ends when the upstream is done, not when the slowest reader is. A client that keeps
up gets each chunk as soon as it arrives.

Reading the client with a deadline (`read_client`) is here too: a client that sends nothing for
`client_idle_s` is answered `client_timeout`.
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
from collections import deque
from collections.abc import AsyncIterator
from typing import IO

from aiohttp import StreamReader, web

from mgpumanager.errors import BrokerError, ClientDisconnected, ErrorCode

SPOOL_MEMORY_BYTES = 1024 * 1024
# An answer's share of memory: the kernel's socket buffers hold a few MiB more for a client
# that keeps up; past both, a slow reader's answer waits on disk.
ANSWER_MEMORY_BYTES = 256 * 1024
CHUNK_BYTES = 64 * 1024
# A body being spooled is taken from aiohttp's buffer in pieces as large as it holds them (a
# smaller read copies each piece into slices), and the file's blocks are reserved this far
# ahead of its end: the file system then allocates them once, not one write at a time.
SPOOL_READ_BYTES = 1024 * 1024
SPOOL_RESERVE_BYTES = 8 * 1024 * 1024
# A spool file at least this large is let go by a worker thread (SpooledBody.close).
RELEASE_AFTER_BYTES = 32 * 1024 * 1024


def spooled_file() -> IO[bytes]:
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)


async def read_client(
    stream: StreamReader, idle_s: float, consumer: str | None, *, limit: int = CHUNK_BYTES
) -> bytes:
    """The next piece of a request body (b"" at its end). A client that sends nothing for
    `idle_s` gets `client_timeout`; a body aiohttp cannot decode (bad chunked framing, a
    broken gzip stream) is a `bad_request`; a client that went away mid-body is
    ClientDisconnected."""
    try:
        # What has arrived already is taken without a wait (or a timer): a small body is
        # usually all here with its headers.
        chunk = stream.read_nowait(limit)
        if chunk or stream.at_eof():
            return chunk
        async with asyncio.timeout(idle_s):
            return await stream.read(limit)
    except TimeoutError:
        raise BrokerError(
            ErrorCode.CLIENT_TIMEOUT,
            f"the client sent nothing for client_idle_s ({idle_s:g} s)",
            consumer=consumer,
        ) from None
    except web.RequestPayloadError as exc:
        raise BrokerError(
            ErrorCode.BAD_REQUEST, f"malformed request body: {exc}", consumer=consumer
        ) from None
    except ConnectionError as exc:
        raise ClientDisconnected(f"the client of {consumer or 'the broker'} went away") from exc


class SpooledBody:
    """A request body in a spooled temporary file, maybe followed by the part of the client's
    stream not read yet (`rest`; None once `receive_rest` has read it all). `exact`: the file
    holds the client's bytes unchanged (False once a field in it was rewritten)."""

    def __init__(
        self, file: IO[bytes], rest: StreamReader | None = None, *, exact: bool = True
    ) -> None:
        self.file = file
        self.rest = rest
        self.exact = exact

    @property
    def size(self) -> int:
        self.file.seek(0, 2)
        return self.file.tell()

    async def receive_rest(self, max_bytes: int, idle_s: float, consumer: str | None) -> None:
        """Read what the client has still to send into the file, bounded by `max_bytes` in
        all (then `payload_too_large`) and by `idle_s` between pieces."""
        if self.rest is None:
            return
        seen = self.size
        # A file on disk has its blocks reserved ahead (posix_fallocate), which makes its
        # writes cheaper; the reserve past the last byte is cut off again at the end.
        fd = self.file.fileno() if isinstance(self.file, _DISK_FILES) else None
        reserved = seen
        try:
            while chunk := await read_client(self.rest, idle_s, consumer, limit=SPOOL_READ_BYTES):
                seen += len(chunk)
                if seen > max_bytes:
                    raise too_large(max_bytes, consumer)
                if fd is not None and seen > reserved:
                    ahead = min(reserved + SPOOL_RESERVE_BYTES, max_bytes)
                    if not _reserve(fd, reserved, max(seen, ahead)):
                        fd = None  # refused (a full disk): the writes allocate as they go
                    else:
                        reserved = max(seen, ahead)
                self.file.write(chunk)
        finally:
            if reserved > (end := self.file.tell()):
                self.file.flush()
                os.ftruncate(self.file.fileno(), end)
        self.rest = None

    def read_all(self) -> bytes:
        self.file.seek(0)
        return self.file.read()

    async def chunks(self, idle_s: float, consumer: str | None) -> AsyncIterator[bytes]:
        """The file, then whatever the client still sends (each piece within `idle_s`)."""
        self.file.seek(0)
        while chunk := self.file.read(CHUNK_BYTES):
            yield chunk
        if self.rest is not None:
            while chunk := await read_client(self.rest, idle_s, consumer):
                yield chunk

    def close(self) -> None:
        """Close the file. A large file on disk has its last descriptor closed by a worker
        thread: the kernel frees its pages then (tens of ms for hundreds of MiB), and the
        event loop goes on to send the answer meanwhile."""
        if self.file.closed:
            return
        fd = None
        if isinstance(self.file, _DISK_FILES) and self.size >= RELEASE_AFTER_BYTES:
            fd = os.dup(self.file.fileno())  # the file's own close is cheap while fd holds it
        self.file.close()
        if fd is not None:
            _release(fd)


# Spool files on disk, whose descriptor may be used. A SpooledTemporaryFile is not one: asking
# its fileno() would move a small one to disk.
_DISK_FILES = (io.FileIO, io.BufferedRandom)


def _release(fd: int) -> None:
    """Close `fd` in the loop's default executor (at once where no loop runs)."""
    try:
        asyncio.get_running_loop().run_in_executor(None, os.close, fd)
    except RuntimeError:  # no loop runs, or its executor is shut down already (the daemon ends)
        os.close(fd)


def _reserve(fd: int, start: int, end: int) -> bool:
    """Reserve the file's blocks from `start` to `end`; False where the file system refused."""
    try:
        os.posix_fallocate(fd, start, end - start)
    except OSError:
        return False
    return True


async def receive_body(
    stream: StreamReader, max_bytes: int, idle_s: float, consumer: str | None
) -> bytes | SpooledBody:
    """The client's whole body: bytes while it fits in `SPOOL_MEMORY_BYTES` (most job bodies,
    a JSON prompt, with no file made), else a SpooledBody in a temporary file. Bounded by
    `max_bytes` in all (then `payload_too_large`) and by `idle_s` between pieces."""
    chunks: list[bytes] = []
    seen = 0
    while chunk := await read_client(stream, idle_s, consumer, limit=SPOOL_READ_BYTES):
        seen += len(chunk)
        if seen > max_bytes:
            raise too_large(max_bytes, consumer)
        chunks.append(chunk)
        if seen > SPOOL_MEMORY_BYTES:
            body = SpooledBody(tempfile.TemporaryFile(), stream)  # noqa: SIM115
            try:
                body.file.writelines(chunks)
                await body.receive_rest(max_bytes, idle_s, consumer)
            except BaseException:
                body.close()
                raise
            return body
    return b"".join(chunks)


def too_large(max_body_bytes: int, consumer: str | None) -> BrokerError:
    return BrokerError(
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"request body is larger than max_body_mib ({max_body_bytes // (1024 * 1024)} MiB)",
        consumer=consumer,
    )


class AnswerBuffer:
    """A first-in first-out byte queue between an upstream (`put`, never waits) and a client
    (`get`, waits for data): chunks stay in memory up to `memory_bytes`, the rest goes to a
    temporary file and is read back in order. Once the file has been read to its end it is
    emptied and memory is used again. The writer ends it with `end()` or `fail()`."""

    def __init__(self, memory_bytes: int = ANSWER_MEMORY_BYTES) -> None:
        self.memory_bytes = memory_bytes
        self._memory: deque[bytes] = deque()
        self._memory_size = 0
        self._file: IO[bytes] | None = None
        self._read_at = 0
        self._written_at = 0
        self._ended = False
        self.failed = False
        self._ready = asyncio.Event()
        self.total = 0  # bytes put in all
        self.spilled = 0  # of which went through the file

    @property
    def spilling(self) -> bool:
        """The next piece may go to the file: memory is full, or the file holds bytes not taken
        yet (which everything after them follows)."""
        return self._written_at > self._read_at or self._memory_size >= self.memory_bytes

    @property
    def pending(self) -> int:
        """Bytes put and not taken yet."""
        return self._memory_size + self._written_at - self._read_at

    def put(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.total += len(chunk)
        # Once the file holds bytes not read yet, everything after them goes there too: the
        # memory deque only ever holds bytes older than the file's. One piece is always let
        # into empty memory, however large: the loop may read more at once than memory_bytes
        # (uvloop reads 750 KB), and a client that keeps up would otherwise take every byte
        # through the file.
        if self._written_at == self._read_at and (
            not self._memory or self._memory_size + len(chunk) <= self.memory_bytes
        ):
            self._memory.append(chunk)
            self._memory_size += len(chunk)
        else:
            if self._file is None:
                self._file = tempfile.TemporaryFile()  # noqa: SIM115
            self._file.seek(self._written_at)
            self._file.write(chunk)
            self._written_at += len(chunk)
            self.spilled += len(chunk)
        self._ready.set()

    def end(self) -> None:
        self._ended = True
        self._ready.set()

    def fail(self) -> None:
        """The upstream broke off: the client gets what came, then is cut off."""
        self.failed = True
        self.end()

    async def get(self) -> bytes | None:
        """The next chunk; None once everything put before `end()` has been taken."""
        while True:
            if self._memory:
                chunk = self._memory.popleft()
                self._memory_size -= len(chunk)
                return chunk
            if self._file is not None and self._read_at < self._written_at:
                self._file.seek(self._read_at)
                chunk = self._file.read(min(CHUNK_BYTES, self._written_at - self._read_at))
                self._read_at += len(chunk)
                if self._read_at == self._written_at:  # all read back: start the file over
                    self._file.seek(0)
                    self._file.truncate()
                    self._read_at = self._written_at = 0
                return chunk
            if self._ended:
                return None
            self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._memory.clear()
        self._memory_size = 0
        self._read_at = self._written_at = 0
