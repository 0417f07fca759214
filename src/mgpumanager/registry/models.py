"""The registry (`config/consumers.yaml`): one pydantic model per section, defined once.

Reading a file into these models, with every problem listed by key path and line, is
`registry.load`; the package re-exports both.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from mgpumanager.registry.origins import normal_host, normal_origin

KINDS = ("tts", "stt", "llm", "image")


class AdapterType(enum.StrEnum):
    GENERIC = "generic"
    OLLAMA = "ollama"
    COMFYUI = "comfyui"
    SPEACHES = "speaches"
    COMMAND = "command"
    VLLM = "vllm"
    DOCKER = "docker"


RegistryAction = Literal["unload", "load"]

# Which of the registry's `unload:` / `load:` keys each type honours: a written call replaces
# the adapter's own way. Ollama and speaches unload per model through their own API, so they
# take neither; ComfyUI's `/free` may be rewritten, its load is lazy. The adapters and
# `check-config` both read this table.
HONOURED_ACTIONS: dict[AdapterType, frozenset[RegistryAction]] = {
    AdapterType.GENERIC: frozenset({"unload", "load"}),
    AdapterType.OLLAMA: frozenset(),
    AdapterType.COMFYUI: frozenset({"unload"}),
    AdapterType.SPEACHES: frozenset(),
    AdapterType.COMMAND: frozenset({"unload", "load"}),
    AdapterType.VLLM: frozenset({"unload", "load"}),
    AdapterType.DOCKER: frozenset(),  # stopping and starting its container is its way
}

# How a GPU process running in a container is named (after its command line) by the GPU
# reader, and so what a consumer with `container:` is measured by.
CONTAINER_TAG = "[container:{}]"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveFloat = Annotated[float, Field(gt=0)]
HttpMethod = Literal["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]


def _check_path(v: str) -> str:
    """A path on a consumer: absolute, and nothing an HTTP request line cannot carry."""
    if not v.startswith("/"):
        raise ValueError(f"must start with '/' (got {v!r})")
    if any(c.isspace() or not c.isprintable() for c in v):
        raise ValueError(f"no spaces or control characters in a path (got {v!r})")
    return v


# A path on a consumer (health, paths.<kind>, unload, load).
UpstreamPath = Annotated[str, AfterValidator(_check_path)]


class StreamDetect(_Model):
    """A request streams its answer when its JSON body's `field` equals `equals`."""

    field: Annotated[str, Field(min_length=1)]
    equals: Any = True


class HttpCall(_Model):
    """An HTTP call to a consumer: `{method, path, body}`. On a generic consumer's `paths` and
    `scheduled`, `streams: true` (its answer always streams) or `stream_detect` (when the body
    asks for a stream) say that a waiting request of that route gets the consumer's
    `keepalive` frames."""

    method: HttpMethod = "POST"
    path: UpstreamPath
    body: Any = None
    streams: bool = False
    stream_detect: StreamDetect | None = None


class Keepalive(_Model):
    """What a generic consumer's streamed answers look like while they wait: the content type
    the early headers declare, and the frame sent every feedback_interval_s (an SSE comment
    such as ": waiting\n\n", or an NDJSON line its clients skip)."""

    content_type: Annotated[str, Field(min_length=1)] = "text/event-stream"
    frame: Annotated[str, Field(min_length=1)] = ": waiting\n\n"


class Action(_Model):
    """How to unload or load a consumer: an HTTP call, or (type `command`) an argv list."""

    method: HttpMethod = "POST"
    path: UpstreamPath | None = None
    body: Any = None
    command: list[str] | None = None
    timeout_s: PositiveFloat = 60.0

    @model_validator(mode="after")
    def _one_kind(self) -> Action:
        if (self.path is None) == (self.command is None):
            raise ValueError("give exactly one of 'path' (HTTP call) or 'command' (argv list)")
        if self.command is not None and not self.command:
            raise ValueError("command must not be empty")
        return self


class HealthConfig(_Model):
    method: HttpMethod = "GET"
    path: UpstreamPath = "/health"
    interval_s: PositiveFloat = 5.0
    timeout_s: PositiveFloat = 2.0


class ModelEntry(_Model):
    """One model of an Ollama / speaches / vLLM / OpenAI-style consumer. In the registry a plain
    name is shorthand for `{name: NAME, preload: true}` (the meaning plain names always had:
    the models its load call brings in)."""

    name: Annotated[str, Field(min_length=1)]
    vram_mib: int | None = Field(default=None, ge=0)  # else the upstream's own figure
    preload: bool = False  # loaded by the consumer's load (and by warm restore)
    # Its weight files (paths or globs), read into the page cache before its turn (prefetch).
    weights: list[str] = []

    @model_validator(mode="before")
    @classmethod
    def _plain_name(cls, value: Any) -> Any:
        return {"name": value, "preload": True} if isinstance(value, str) else value


class ConsumerConfig(_Model):
    type: AdapterType = AdapterType.GENERIC
    url: str
    health: HealthConfig = HealthConfig()
    paths: dict[str, HttpCall] = {}
    vram_resident_mib: int = Field(ge=0)
    unload: Action | None = None
    load: Action | None = None
    can_coexist_with: list[str] = []
    priority: int = Field(default=2, ge=0, le=4)
    max_concurrency: int = Field(default=1, ge=1, le=64)
    pinned: bool = False
    load_timeout_s: PositiveFloat = 120.0
    unload_timeout_s: PositiveFloat = 30.0
    run_timeout_s: PositiveFloat = 600.0
    # Substrings of a GPU process's command line (or, on the simulated GPU, its owner name)
    # that belong to this consumer; lets the GPU reader measure its real VRAM use.
    gpu_processes: list[str] = []
    # Models it serves (ollama, speaches, vllm, OpenAI-style): their VRAM cost, which its load
    # call brings in, and which OpenAI `model` names route here. Empty: all it reports.
    models: list[ModelEntry] = []
    # OpenAI model names clients insist on -> one of this consumer's models.
    aliases: dict[str, str] = {}
    # Weight files (paths or globs) its load reads, read into the page cache while the job
    # before its turn runs (prefetch); a model's own `weights` replace these for that model.
    weights: list[str] = []
    # Folders its model files live in: ComfyUI's models/ folders (a loader node's file name is
    # looked for in each, and in its subfolders); an Ollama blob path is looked for in each too
    # (OLLAMA_MODELS) when the path /api/show gives is not readable here.
    model_dirs: list[str] = []
    # A generic consumer that serves OpenAI routes (/v1/chat/completions, /v1/audio/speech...).
    openai: bool = False
    # Further requests that use the GPU, scheduled when they arrive under /upstream/<name>/.
    scheduled: list[HttpCall] = []
    # Unload it after this many seconds unused (when no job waits). None: never.
    idle_unload_s: PositiveFloat | None = None
    # The GPUs it runs on, by NVML index or UUID (docs/multi-gpu.md). None: every device (the
    # coarse, safe choice). Jobs of consumers on disjoint devices run at the same time.
    devices: list[int | str] | None = Field(default=None, min_length=1)
    # HOST:PORT where the broker also listens with this consumer's own API at the root (the
    # service moves to another port and the broker takes its usual one). None: no front door.
    front_door: str | None = None
    # The Docker container it runs in: unloading stops it (with `stop_timeout_s` of grace
    # before SIGKILL), loading starts it (upstreams/adapters/docker.py). Any type may name one;
    # `type: docker` is the plain HTTP one for services with no protocol of their own.
    container: Annotated[str, Field(min_length=1)] | None = None
    stop_timeout_s: float = Field(default=10.0, ge=0)
    # A waiting streamed request gets a frame this often (None: the top-level value).
    feedback_interval_s: PositiveFloat | None = None
    # The wait also said in the client's visible channel, once per change (Ollama `thinking`,
    # OpenAI `reasoning_content`): "queued, 2 ahead", "loading qwen2.5:14b".
    loading_notice: bool = False
    # Non-streamed answers too get their status line at once while they wait (then JSON
    # whitespace until the answer): an error that follows comes in the body, under 200.
    early_headers: bool = False
    # A generic consumer's streamed routes (`streams`/`stream_detect`): its keep-alive frame.
    keepalive: Keepalive | None = None

    @model_validator(mode="before")
    @classmethod
    def _container_processes(cls, data: Any) -> Any:
        # Its processes on the GPU are those the reader finds in its container.
        if isinstance(data, Mapping) and isinstance(data.get("container"), str):
            tag = CONTAINER_TAG.format(data["container"])
            processes = data.get("gpu_processes", [])
            if isinstance(processes, list) and tag not in processes:
                data = {**data, "gpu_processes": [*processes, tag]}
        return data

    @field_validator("front_door", mode="before")
    @classmethod
    def _front_door_address(cls, v: object) -> object:
        wanted = f"front_door must be HOST:PORT, e.g. 127.0.0.1:11434 (got {v!r})"
        if v is None:
            return v
        if not isinstance(v, str):  # `front_door: 11434` is an int to YAML
            raise ValueError(wanted)
        try:
            split_listen(v)
        except ValueError:
            raise ValueError(wanted) from None
        return v

    @property
    def preload_models(self) -> list[str]:
        return [m.name for m in self.models if m.preload]

    def model_entry(self, name: str) -> ModelEntry | None:
        name = self.aliases.get(name, name)
        return next((m for m in self.models if m.name == name), None)


DEFAULT_PATHS: Mapping[str, HttpCall] = {
    "tts": HttpCall(method="POST", path="/api/synthesize"),
    "stt": HttpCall(method="POST", path="/api/transcribe"),
    "llm": HttpCall(method="POST", path="/api/generate"),
    "image": HttpCall(method="POST", path="/prompt"),
}


class StaticDevice(_Model):
    """One card of a `static` box (no readings): its NVML UUID and its size."""

    uuid: str = Field(min_length=1)
    total_mib: int = Field(gt=0)


class GpuConfig(_Model):
    backend: Literal["auto", "nvml", "static", "sim"] = "auto"
    index: int = Field(default=0, ge=0)
    total_mib: int | None = Field(default=None, gt=0)
    # backend static: every card of the box (a single total_mib still means one device).
    devices: list[StaticDevice] | None = Field(default=None, min_length=1)
    safety_margin_mib: int = Field(default=512, ge=0)
    sim_url: str = "http://127.0.0.1:8799"
    poll_interval_s: PositiveFloat = 0.1
    # While an eviction waits for its memory to come back (and a load for its readiness), the
    # GPU and the upstream are read this often: the swap goes on as soon as the card frees.
    # NVML answers in well under a millisecond; the background readings stay at their pace.
    confirm_poll_s: PositiveFloat = 0.01
    # How often residency is re-read from the upstreams and the GPU in the background (work
    # done around the broker); it is also re-read before every eviction plan.
    reconcile_interval_s: PositiveFloat = 5.0
    # backend static only: after an upstream says it let go, wait this long before loading
    # anything in its place (the driver frees memory 0.5-1.5 s after a process let go).
    static_settle_s: float = Field(default=1.5, ge=0)


class SchedulerConfig(_Model):
    policy: Literal["priority", "fifo"] = "priority"
    max_queue: int = Field(default=256, ge=1)
    queue_timeout_s: PositiveFloat = 600.0
    aging_s: PositiveFloat = 30.0
    # Caps of swap affinity, which otherwise follows the load (scheduling/order.py).
    affinity_wait_s: float = Field(default=120.0, ge=0)
    max_batch: int = Field(default=32, ge=1)
    allow_priority_header: bool = False
    drain_timeout_s: PositiveFloat = 30.0
    # Several GPUs: once the oldest blocked multi-device job has waited this long, its devices
    # are reserved for it (jobs on other devices still run).
    max_wait_s: PositiveFloat = 30.0


class IdleConfig(_Model):
    # Consumers (or consumer/model) brought back when the GPU has been idle for warm_after_s.
    warm: list[str] = []
    warm_after_s: PositiveFloat = 30.0


class PrefetchConfig(_Model):
    """`prefetch`: reading the next tenure's weight files into the page cache while the
    current job runs. `prefetch: false` turns it off."""

    enabled: bool = True
    # Never more than this share of MemAvailable (read when a prefetch starts).
    max_ram_fraction: float = Field(default=0.5, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _switch(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value


def _check_token(v: SecretStr) -> SecretStr:
    # A header carries the token: visible ASCII only, or no request could ever match it.
    if not re.fullmatch(r"[\x21-\x7e]+", v.get_secret_value()):
        raise ValueError("a token is one or more visible ASCII characters (no spaces)")
    return v


Token = Annotated[SecretStr, AfterValidator(_check_token)]
AllowedHost = Annotated[str, AfterValidator(normal_host)]
AllowedOrigin = Annotated[str, AfterValidator(normal_origin)]


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as far as its bearer token tells: the token's name (for logs) and
    the highest X-Priority it may ask for."""

    name: str
    max_priority: int


class TokenConfig(_Model):
    """One named bearer token of `auth.tokens`."""

    name: str = Field(min_length=1, max_length=64)
    token: Token
    max_priority: int = Field(default=4, ge=0, le=4)

    @field_validator("name")
    @classmethod
    def _name_plain(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]*", v):
            raise ValueError(f"a token name is letters, digits and _.@- (got {v!r})")
        return v


# The name `auth.token` (the single, unnamed token) goes by in logs and where callers are shown.
DEFAULT_CALLER = "default"


class AuthConfig(_Model):
    # When any token is set, every route but /healthz needs `Authorization: Bearer <token>`.
    token: Token | None = None
    tokens: list[TokenConfig] = []
    # Serving beyond loopback without a token is refused unless this says it is meant.
    allow_unauthenticated: bool = False
    # Host names every listener answers to besides loopback names and the address a
    # connection arrived on ("*": any); a foreign Host (DNS rebinding) gets 403 forbidden.
    allowed_hosts: list[AllowedHost] = []
    # Web origins (scheme://host[:port]) besides a listener's own whose pages may use it;
    # they get CORS headers. A request from any other Origin gets 403 forbidden.
    allowed_origins: list[AllowedOrigin] = []

    @property
    def required(self) -> bool:
        return self.token is not None or bool(self.tokens)

    def callers(self) -> list[tuple[Caller, bytes]]:
        """Every accepted token as (who it is, the token's bytes)."""
        found = [(Caller(t.name, t.max_priority), t.token.get_secret_value()) for t in self.tokens]
        if self.token is not None:
            found.append((Caller(DEFAULT_CALLER, 4), self.token.get_secret_value()))
        return [(caller, secret.encode("ascii")) for caller, secret in found]


class Config(_Model):
    listen: str = "127.0.0.1:8770"
    max_body_mib: int = Field(default=256, ge=1)
    # A client that sends nothing of its body, or takes nothing of its answer, for this long
    # is dropped (its body is received whole before its job takes the GPU, and its answer is
    # buffered, so a slow client never holds the lease).
    client_idle_s: PositiveFloat = 60.0
    # A connection must deliver a whole request head within this many seconds of opening or
    # of its previous answer, or it is closed (slow header trickling; idle keep-alive too).
    header_timeout_s: PositiveFloat = 15.0
    # Open client connections across every listener; one more is answered
    # too_many_connections and closed. Lowered at start when the process's file limit is
    # too small to honour it.
    max_connections: int = Field(default=4096, ge=1)
    # A streamed request that waits (queued, or its model loading) gets a frame this often
    # until the upstream's first bytes (a consumer's own feedback_interval_s overrides it).
    feedback_interval_s: PositiveFloat = 1.0
    gpu: GpuConfig = GpuConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    auth: AuthConfig = AuthConfig()
    idle: IdleConfig = IdleConfig()
    prefetch: PrefetchConfig = PrefetchConfig()
    routing: dict[str, str] = {}
    audio_proxy: str | None = None
    consumers: dict[str, ConsumerConfig]

    @field_validator("listen", mode="before")
    @classmethod
    def _listen_text(cls, v: object) -> object:
        if not isinstance(v, str):
            # `listen: 9470` is an int to YAML; say what is wanted, not "a valid string".
            raise ValueError(f"listen must be HOST:PORT, e.g. 127.0.0.1:9470 (got {v!r})")
        return v

    @property
    def listen_host_port(self) -> tuple[str, int]:
        return split_listen(self.listen)

    def exposure_problems(self) -> list[tuple[tuple[str, ...], str]]:
        """Why serving this registry would be unsafe, by key: a listener (`listen`, a consumer's
        `front_door`) beyond loopback with no token lets anyone who reaches the port drive the
        GPU (and, on `listen`, its admin routes)."""
        if self.auth.required or self.auth.allow_unauthenticated:
            return []
        listeners: list[tuple[tuple[str, ...], str]] = [(("listen",), self.listen)]
        listeners += [
            (("consumers", name, "front_door"), c.front_door)
            for name, c in self.consumers.items()
            if c.front_door is not None
        ]
        problems = []
        for loc, address in listeners:
            try:
                host, _ = split_listen(address)
            except ValueError:
                continue  # reported as a bad address already
            if not is_loopback(host):
                problems.append(
                    (
                        loc,
                        f"{loc[-1]} {address!r} is reachable beyond this machine and auth has no "
                        "token: set auth.token (or auth.tokens), or auth.allow_unauthenticated: "
                        "true to serve without one on purpose",
                    )
                )
        return problems

    def coexist(self, a: str, b: str) -> bool:
        """`can_coexist_with` is symmetric: one side listing the other is enough."""
        return b in self.consumers[a].can_coexist_with or a in self.consumers[b].can_coexist_with


def split_listen(listen: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([^\]]*)\]?:(\d{1,5})", listen)
    if m is None or not 0 <= int(m.group(2)) <= 65535:
        raise ValueError(f"listen must be HOST:PORT, e.g. 127.0.0.1:9470 (got {listen!r})")
    return m.group(1), int(m.group(2))


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses; an empty host or 0.0.0.0 means every
    interface, and any other name may resolve anywhere."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """`url` without the credentials it may carry (`http://ops:pw@host` → `http://***@host`),
    for status, logs and error messages."""
    try:
        parts = urlsplit(url)
        if "@" not in parts.netloc:
            return url
        return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))
    except ValueError:
        # Not even parseable: drop everything between the scheme and the last '@'.
        return re.sub(r"(?s)^([^:/]*://)?.*@", lambda m: (m.group(1) or "") + "***@", url)


__all__ = [
    "CONTAINER_TAG",
    "DEFAULT_PATHS",
    "HONOURED_ACTIONS",
    "KINDS",
    "Action",
    "AdapterType",
    "AuthConfig",
    "Caller",
    "Config",
    "ConsumerConfig",
    "GpuConfig",
    "HealthConfig",
    "HttpCall",
    "IdleConfig",
    "Keepalive",
    "ModelEntry",
    "PrefetchConfig",
    "SchedulerConfig",
    "StaticDevice",
    "StreamDetect",
    "TokenConfig",
    "is_loopback",
    "redact_url",
    "split_listen",
]
