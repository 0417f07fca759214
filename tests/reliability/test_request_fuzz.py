"""Generated requests, as raw bytes over a socket, against a real `mgpumanager serve` process:
odd methods, paths (dot segments, percent-encodings, NUL, non-UTF-8), header sets (duplicate or
conflicting lengths, odd encodings, Expect, hostile Authorization, X-Priority, Upgrade) and
bodies (random bytes, JSON of every shape, deep nesting, forms). Whatever arrives, the broker
answers HTTP or closes the connection: never a traceback or an ERROR line in its log, never a
5xx but the documented ones (`scheduler_error`, the code of a bug, never), never its bytes
echoed where a secret could be; and it still serves afterwards.

1,000 requests in `make test`; `make soak` sends 10,000 (`MGPU_SOAK`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Daemon, assert_clean_log, daemon, figure, scaled, write_registry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from conftest import consumer, make_config
from mgpumanager.errors import ERROR_TABLE, ErrorCode

pytestmark = pytest.mark.slow

EXAMPLES = scaled(1000, 10_000)
TOKEN = "fuzz-T0ken"

ROUTES = [
    "/", "/healthz", "/v1/status", "/metrics", "/v1/tts", "/v1/stt", "/v1/llm", "/v1/image",
    "/v1/models", "/v1/models/m", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
    "/v1/audio/speech", "/v1/audio/transcriptions", "/v1/images/generations",
    "/api/version", "/api/tags", "/api/ps", "/api/generate", "/api/chat", "/api/embed",
    "/api/show", "/api/pull", "/api/delete", "/api/blobs/sha256:00", "/audio/x.wav",
    "/upstream/ollama/api/generate", "/upstream/comfyui/prompt", "/upstream/comfyui/history/1",
    "/upstream/nobody/x", "/v1/admin/consumers/ollama/unload", "/v1/admin/consumers/x/load",
]  # fmt: skip
SEGMENTS = [
    "..", ".", "%2e%2e", "%252e%252e", "%2f", "%00", "%ff%fe", "%", "%zz", "a b", "\u00e9",
    "x" * 300, "~", ";a=b", "?q=1", "#f", "//", "\\", "%5c",
]  # fmt: skip
METHODS = ["POST"] * 6 + ["GET"] * 4 + ["PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE"]
ODD_METHODS = ["FOO", "get", "G@T", "", "POST POST", "\u00e9", "M" * 40]
VERSIONS = ["HTTP/1.1"] * 30 + ["HTTP/1.0"] * 5 + ["HTTP/2.0", "HTTP/1.9", "HTTX/1.1", ""]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
json_objects = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["m", "llm:14b", "gpt-4o-mini", "", "../x", "a/../../b"])
        | st.text(max_size=30),
        "prompt": json_values,
        "prompt_id": st.sampled_from(["../free", "ok-1", "", "a" * 200]) | json_values,
        "stream": st.booleans(),
        "messages": json_values,
        "name": st.text(max_size=10),
    },
)
bodies: st.SearchStrategy[bytes] = st.one_of(
    st.just(b""),
    st.binary(max_size=600),
    json_objects.map(lambda o: json.dumps(o).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.just(b"9" * 5000),
    st.builds(
        lambda model, data: (
            b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + model + b"\r\n"
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
            + data
            + b"\r\n--B--\r\n"
        ),
        st.binary(max_size=40),
        st.binary(max_size=200),
    ),
)
printable = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
header_values = st.one_of(
    *[printable] * 9,  # mostly well-formed, so most requests reach a handler
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)
benign_headers = st.one_of(
    st.tuples(st.sampled_from(["Content-Type"]), st.sampled_from([
        "application/json", "multipart/form-data; boundary=B", "multipart/form-data",
        "text/plain", "application/x-www-form-urlencoded", "multipart/x; boundary=",
    ]) | header_values),
    st.tuples(st.just("Authorization"), st.sampled_from([
        f"Bearer {TOKEN}", "Bearer", "Basic Zm9vOmJhcg==", f"Bearer {TOKEN}\x00", "\xff\xfe",
    ]) | header_values),
    st.tuples(st.just("X-Priority"), st.sampled_from(["4", "-9", "99", "x", "1.5"])),
    st.tuples(st.just("Origin"), st.sampled_from(["http://evil", "null"]) | header_values),
    st.tuples(st.just("Accept"), st.sampled_from(["text/html", "*/*"])),
    st.tuples(
        st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20),
        header_values,
    ),
)  # fmt: skip
framing_headers = st.one_of(
    st.tuples(st.just("Transfer-Encoding"), st.sampled_from([
        "chunked", "gzip", "chunked, chunked", "identity", "gzip, chunked",
    ])),
    st.tuples(st.just("Content-Length"), st.sampled_from(["-1", "abc", "0", "1e3", " 5"])),
    st.tuples(st.just("Content-Encoding"), st.sampled_from(["gzip", "deflate", "br", "x"])),
    st.tuples(st.just("Expect"), st.sampled_from(["100-continue", "200-ok", ""])),
    st.tuples(st.just("Upgrade"), st.sampled_from(["websocket", "h2c"])),
)  # fmt: skip
# Framing and protocol headers one time in five: most requests should reach a handler.
extra_headers = st.lists(st.one_of(*[benign_headers] * 4, framing_headers), max_size=5)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    # (sampled_from rather than integers: hypothesis draws an integer's bounds often)
    odd = draw(st.sampled_from([False] * 9 + [True]))  # one in ten: a method aiohttp refuses
    method = draw(st.sampled_from(ODD_METHODS if odd else METHODS))
    path = draw(st.sampled_from(ROUTES))
    for _ in range(draw(st.sampled_from([0] * 6 + [1, 2]))):
        hostile = draw(st.sampled_from([False, False, True]))
        segment = (
            st.sampled_from(SEGMENTS)
            if hostile
            else st.from_regex(r"[A-Za-z0-9._~-]{1,12}", fullmatch=True)
        )
        path += "/" + draw(segment | st.text(max_size=6) if hostile else segment)
    if draw(st.sampled_from([False] * 3 + [True])):
        path += "?" + draw(st.sampled_from(["a=1", "x=%ff", "q=" + "z" * 50, "&&=", "%"]))
    version = draw(st.sampled_from(VERSIONS))
    body = draw(bodies)
    headers = draw(extra_headers)
    line = f"{method} {path} {version}".encode("utf-8", "surrogateescape")
    head = [line, b"Host: localhost"]
    if draw(st.sampled_from([True, True, True, False])):  # most carry the right token
        head.append(f"Authorization: Bearer {TOKEN}".encode())
    framing = draw(st.sampled_from(["length"] * 20 + ["none", "short", "chunked", "dup"]))
    if framing == "length":
        head.append(b"Content-Length: %d" % len(body))
    elif framing == "short":  # the rest of the body reads as the next request
        head.append(b"Content-Length: %d" % (len(body) // 2))
    elif framing == "dup":
        head += [b"Content-Length: %d" % len(body)] * 2
    elif framing == "chunked":
        head.append(b"Transfer-Encoding: chunked")
        body = (b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
    head += [f"{name}: {value}".encode("latin-1", "replace") for name, value in headers]
    head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@pytest.fixture(scope="module")
def fuzz_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, dict[str, int]]]:
    """The daemon in front of a quick upstream, each a process of its own; hypothesis runs
    the examples synchronously from here."""
    echo = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("echo_upstream.py"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    loop = asyncio.new_event_loop()
    try:
        assert echo.stdout is not None
        line = echo.stdout.readline()
        assert line.startswith("PORT "), line
        url = f"http://127.0.0.1:{int(line.split()[1])}"
        tmp = tmp_path_factory.mktemp("fuzz")
        health = {"path": "/health", "interval_s": 1, "timeout_s": 5}
        config = make_config(
            {
                "mvoice": consumer(url, health=health),
                "ollama": consumer(url, type="ollama", models=["m"], health=health),
                "comfyui": consumer(url, type="comfyui", run_timeout_s=5, health=health),
            },
            routing={"tts": "mvoice", "stt": "mvoice", "llm": "ollama", "image": "comfyui"},
            audio_proxy="mvoice",
            client_idle_s=0.5,
            header_timeout_s=2,
            auth={"token": TOKEN},
            scheduler={"queue_timeout_s": 10, "allow_priority_header": True},
        )
        registry = write_registry(tmp / "registry.yaml", config)
        box = daemon(registry, tmp / "daemon.log")
        d = loop.run_until_complete(box.__aenter__())
        try:
            yield d, {}
        finally:
            loop.run_until_complete(box.__aexit__(None, None, None))
    finally:
        loop.close()
        echo.kill()
        echo.wait()
        if echo.stdout is not None:
            echo.stdout.close()


def exchange(url: str, raw: bytes) -> bytes:
    u = URL(url)
    assert u.host is not None and u.port is not None
    with socket.create_connection((u.host, u.port), timeout=30) as sock:
        with contextlib.suppress(ConnectionError):  # refused before all was sent: what
            sock.sendall(raw)  # came back still counts
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionError:
            pass
    return b"".join(chunks)


def error_code(body: bytes) -> str | None:
    """The broker's error code in any dialect, or None if the body is not one."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    err = doc.get("error")
    code = err.get("code") if isinstance(err, dict) else doc.get("code", err)
    return code if isinstance(code, str) else None


@pytest.mark.timeout(1800)
def test_generated_requests_get_answers_never_tracebacks(
    fuzz_box: tuple[Daemon, dict[str, int]],
) -> None:
    box, counts = fuzz_box
    fds_before = box.open_fds()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,  # the same requests on every run
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(raw=requests())
    def one(raw: bytes) -> None:
        try:
            answer = exchange(box.url, raw)
        except TimeoutError:
            try:
                healthz = exchange(box.url, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
            except TimeoutError:
                healthz = b"(no answer either)"
            raise AssertionError(
                f"no answer in 30 s to {raw[:300]!r}; /healthz: {healthz[:100]!r}; "
                f"descriptors {box.open_fds()}; log tail:\n{box.log()[-3000:]}"
            ) from None
        counts["sent"] = counts.get("sent", 0) + 1
        if not answer:
            counts["closed"] = counts.get("closed", 0) + 1
            return
        assert answer.startswith(b"HTTP/"), answer[:200]  # aiohttp answers in the version asked
        head, _, body = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        counts[str(status)] = counts.get(str(status), 0) + 1
        assert b"Traceback" not in answer
        assert TOKEN.encode() not in answer
        if status >= 500:
            code = error_code(body)
            assert code in {str(c) for c in ERROR_TABLE}, (raw[:300], answer[:500])
            assert code != ErrorCode.SCHEDULER_ERROR, (raw[:300], answer[:500])

    one()
    figure(f"request fuzz: {EXAMPLES} generated requests, answers by status", json.dumps(counts))
    assert counts["sent"] == EXAMPLES
    # Still serving, and nothing in the log a client could have caused beyond a WARNING.
    ok = exchange(box.url, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")
    # Nothing leaked: no connection, upstream socket or spool file left open for long.
    figure("request fuzz: daemon descriptors before / after", f"{fds_before} / {box.open_fds()}")
    assert box.open_fds() <= fds_before + 16
    figure("request fuzz: daemon log size (bytes)", Path(box.log_path).stat().st_size)
    assert_clean_log(box.log())
