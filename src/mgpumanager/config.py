"""The registry (`config/consumers.yaml`): one pydantic model per section, defined once.

`load_config(path)` returns a validated `Config` or raises `ConfigError` listing *every*
problem, each with its key path (`consumers.ollama.vram_resident_mib`), its line in the file,
and what is wrong. The CLI's `check-config`, `serve` and SIGHUP reload all go through it.

The file is hostile input until proven otherwise: it must be UTF-8, at most `MAX_BYTES`, nested
at most `MAX_DEPTH` levels, and its aliases may not expand past `MAX_VALUES` values (a 900-byte
"billion laughs" file is refused while composing, before anything is expanded). Anything else
the YAML library or Python would choke on (recursive anchors, 5,000-digit integers, a 30th of
February) is a problem with a line, never a traceback.
"""

from __future__ import annotations

import codecs
import enum
import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

KINDS = ("tts", "stt", "llm", "image")


class AdapterType(enum.StrEnum):
    GENERIC = "generic"
    OLLAMA = "ollama"
    COMFYUI = "comfyui"
    SPEACHES = "speaches"
    COMMAND = "command"
    VLLM = "vllm"


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


class HttpCall(_Model):
    """An HTTP call to a consumer: `{method, path, body}`."""

    method: HttpMethod = "POST"
    path: UpstreamPath
    body: Any = None


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
    # A generic consumer that serves OpenAI routes (/v1/chat/completions, /v1/audio/speech...).
    openai: bool = False
    # Further requests that use the GPU, scheduled when they arrive under /upstream/<name>/.
    scheduled: list[HttpCall] = []
    # Unload it after this many seconds unused (when no job waits). None: never.
    idle_unload_s: PositiveFloat | None = None

    @property
    def preload_models(self) -> list[str]:
        return [m.name for m in self.models if m.preload]

    def model_entry(self, name: str) -> ModelEntry | None:
        name = self.aliases.get(name, name)
        return next((m for m in self.models if m.name == name), None)

    def path_for(self, kind: str) -> HttpCall:
        call = self.paths.get(kind)
        return call if call is not None else DEFAULT_PATHS[kind]


DEFAULT_PATHS: Mapping[str, HttpCall] = {
    "tts": HttpCall(method="POST", path="/api/synthesize"),
    "stt": HttpCall(method="POST", path="/api/transcribe"),
    "llm": HttpCall(method="POST", path="/api/generate"),
    "image": HttpCall(method="POST", path="/prompt"),
}


class GpuConfig(_Model):
    backend: Literal["auto", "nvml", "static", "sim"] = "auto"
    index: int = Field(default=0, ge=0)
    total_mib: int | None = Field(default=None, gt=0)
    safety_margin_mib: int = Field(default=512, ge=0)
    sim_url: str = "http://127.0.0.1:8799"
    poll_interval_s: PositiveFloat = 0.1
    # How often residency is re-read from the upstreams and the GPU in the background (work
    # done around the broker); it is also re-read before every eviction plan.
    reconcile_interval_s: PositiveFloat = 5.0


class SchedulerConfig(_Model):
    policy: Literal["priority", "fifo"] = "priority"
    max_queue: int = Field(default=256, ge=1)
    queue_timeout_s: PositiveFloat = 600.0
    aging_s: PositiveFloat = 30.0
    # Caps of swap affinity, which otherwise follows the load (policy.py).
    affinity_wait_s: float = Field(default=120.0, ge=0)
    max_batch: int = Field(default=32, ge=1)
    allow_priority_header: bool = False
    drain_timeout_s: PositiveFloat = 30.0


class IdleConfig(_Model):
    # Consumers (or consumer/model) brought back when the GPU has been idle for warm_after_s.
    warm: list[str] = []
    warm_after_s: PositiveFloat = 30.0


def _check_token(v: SecretStr) -> SecretStr:
    # A header carries the token: visible ASCII only, or no request could ever match it.
    if not re.fullmatch(r"[\x21-\x7e]+", v.get_secret_value()):
        raise ValueError("a token is one or more visible ASCII characters (no spaces)")
    return v


Token = Annotated[SecretStr, AfterValidator(_check_token)]


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
    gpu: GpuConfig = GpuConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    auth: AuthConfig = AuthConfig()
    idle: IdleConfig = IdleConfig()
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

    def exposure_problem(self) -> str | None:
        """Why serving this registry would be unsafe, or None: listening beyond loopback with
        no token lets anyone who reaches the port drive the GPU and its admin routes."""
        try:
            host, _ = self.listen_host_port
        except ValueError:
            return None  # reported as a bad `listen` already
        if self.auth.required or self.auth.allow_unauthenticated or is_loopback(host):
            return None
        return (
            f"listen {self.listen!r} is reachable beyond this machine and auth has no token: "
            "set auth.token (or auth.tokens), or auth.allow_unauthenticated: true to serve "
            "without one on purpose"
        )

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


# --------------------------------------------------------------------------------------------
# Loading with line numbers


@dataclass(frozen=True)
class ConfigProblem:
    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "line ?"
        return f"{self.path or '<top>'} ({where}): {self.message}"


class ConfigError(Exception):
    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the registry:\n{lines}")


Loc = tuple[str | int, ...]

# Bounds on what a registry may be. A real one is a few KiB, a few levels deep and a few hundred
# values; these are far past that and far short of what would hurt the daemon.
MAX_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_VALUES = 10_000  # counting every value an alias repeats
# Python refuses int(text) past 4,300 digits; no count, size or port in a registry needs more.
MAX_NUMBER_CHARS = 32

_INT_TAG = "tag:yaml.org,2002:int"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(yaml.MarkedYAMLError):
    """A bound of the loader's own (depth, alias expansion, number size, dates)."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class _NumberTooLong(_Refused):
    """Raised while constructing; the walk before it has reported the number with its key."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded while it composes: depth, recursion and the size that
    aliases expand to are known before anything is built or expanded."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self._values = 0
        self._open: set[str] = set()  # anchors whose node is still being composed
        # id(node) -> (values, height) with aliases expanded, computed bottom-up from the
        # children's figures: a billion laughs is measured, never walked.
        self._size: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise _Refused(
                    f"alias *{event.anchor} is used inside its own anchor (a structure that "
                    "contains itself)",
                    event.start_mark,
                )
            node = super().compose_node(parent, index)
            if node is not None:
                self._count(self._size[id(node)][0], event.start_mark)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self._count(1, event.start_mark)
        anchor: str | None = event.anchor
        if anchor is not None:
            self._open.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open.discard(anchor)
        if node is not None:
            self._measure(node)
        return node

    def _count(self, values: int, mark: Any) -> None:
        """The document's values so far, each alias counted as what it expands to: a file
        past the bound is refused where it crosses it, before the rest is even read."""
        self._values += values
        if self._values > MAX_VALUES:
            raise _Refused(
                f"more than {MAX_VALUES} values (an alias counts as all it repeats)", mark
            )

    def _measure(self, node: yaml.Node) -> None:
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        sizes = [self._size[id(child)] for child in children]
        values = 1 + sum(v for v, _ in sizes)
        height = 1 + max((h for _, h in sizes), default=0)
        self._size[id(node)] = (values, height)
        if height > MAX_DEPTH:
            raise _Refused(
                f"nested deeper than {MAX_DEPTH} levels once its aliases are expanded",
                node.start_mark,
            )

    def construct_bounded_int(self, node: yaml.ScalarNode) -> int:
        if len(node.value) > MAX_NUMBER_CHARS:
            raise _NumberTooLong(f"more than {MAX_NUMBER_CHARS} characters", node.start_mark)
        return int(super().construct_yaml_int(node))

    def construct_checked_timestamp(self, node: yaml.ScalarNode) -> object:
        try:
            return super().construct_yaml_timestamp(node)
        except (ValueError, OverflowError):
            raise _Refused(f"{node.value!r} is not a valid date or time", node.start_mark) from None


_Loader.add_constructor(_INT_TAG, _Loader.construct_bounded_int)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _Loader.construct_checked_timestamp)


def _walk(
    node: yaml.Node, loc: Loc, lines: dict[Loc, int], problems: list[ConfigProblem], seen: set[int]
) -> None:
    """Record each key path's line; report duplicate keys and over-long numbers. A node that
    aliases reach more than once is checked once (its lines are recorded at every path)."""
    lines[loc] = node.start_mark.line + 1
    first = id(node) not in seen
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        if first and node.tag == _INT_TAG and len(node.value) > MAX_NUMBER_CHARS:
            problems.append(
                ConfigProblem(
                    _dotted(loc),
                    lines[loc],
                    f"a number of {len(node.value)} characters is not a sane registry value "
                    f"(at most {MAX_NUMBER_CHARS})",
                )
            )
    elif isinstance(node, yaml.MappingNode):
        keys: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            k = key.value if isinstance(key, yaml.ScalarNode) else "<complex key>"
            key_line = key.start_mark.line + 1
            kloc = (*loc, k)
            if first and isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                earlier = keys.get((key.tag, key.value))
                if earlier is None:
                    keys[(key.tag, key.value)] = key_line
                else:
                    problems.append(
                        ConfigProblem(
                            _dotted(kloc),
                            key_line,
                            f"duplicate key {k!r}, also on line {earlier}: keep one (YAML "
                            "would silently use the last)",
                        )
                    )
            _walk(key, kloc, lines, problems, seen)
            _walk(value, kloc, lines, problems, seen)
            lines[kloc] = key_line  # the key's line, not the value's
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*loc, i), lines, problems, seen)


def _line_of(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def _dotted(loc: Loc) -> str:
    return ".".join(str(p) for p in loc)


def _decode(raw: bytes, source: str) -> str:
    """The registry's text: UTF-8 (a UTF-8 byte-order mark is fine), nothing else."""

    def refuse(line: int, message: str) -> ConfigError:
        return ConfigError(
            source, [ConfigProblem("", line, f"the registry must be UTF-8: {message}")]
        )

    for bom, name in (
        (codecs.BOM_UTF32_LE, "UTF-32"),
        (codecs.BOM_UTF32_BE, "UTF-32"),
        (codecs.BOM_UTF16_LE, "UTF-16"),
        (codecs.BOM_UTF16_BE, "UTF-16"),
    ):
        if raw.startswith(bom):
            raise refuse(1, f"this file is {name} (it starts with a {name} byte-order mark)")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise refuse(
            raw.count(b"\n", 0, nul) + 1, "it has NUL bytes (UTF-16 without a byte-order mark?)"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise refuse(line, f"byte 0x{raw[exc.start]:02x} on line {line} is not UTF-8") from None


def _yaml_problem(exc: yaml.YAMLError, text: str) -> ConfigProblem:
    """A YAML error as a problem with a line; its text never quotes the file (a line of the
    registry may hold a token)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        if isinstance(exc, _Refused):
            return ConfigProblem("", line, exc.problem or "refused")
        parts = [p for p in (exc.context, exc.problem) if p]
        return ConfigProblem("", line, "not valid YAML: " + ": ".join(parts))
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        char: object = exc.character  # PyYAML gives the code point (or, decoding, a byte)
        code = ord(char) if isinstance(char, str) and len(char) == 1 else char
        what = f"character #x{code:04x}" if isinstance(code, int) else "a character"
        return ConfigProblem("", line, f"not valid YAML: {what} is not allowed ({exc.reason})")
    return ConfigProblem("", 1, f"not valid YAML: {type(exc).__name__}")


def parse_config(text: str | bytes, source: str = "<config>") -> Config:
    """Validate a registry's text (bytes are decoded as UTF-8) into a `Config`, or raise
    `ConfigError` listing every problem with its key path and line."""
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise ConfigError(source, [ConfigProblem("", 1, f"larger than {MAX_BYTES} bytes")])
        text = _decode(text, source)
    elif len(text) > MAX_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise ConfigError(source, [ConfigProblem("", 1, f"larger than {MAX_BYTES} bytes")])
    lines: dict[Loc, int] = {}
    problems: list[ConfigProblem] = []
    loader: _Loader | None = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is not None:
            _walk(node, (), lines, problems, set())
        data = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as exc:
        if not (isinstance(exc, _NumberTooLong) and problems):
            problems.append(_yaml_problem(exc, text))
        raise ConfigError(source, _in_order(problems)) from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        problems.append(ConfigProblem("", 1, "the registry must be a YAML mapping"))
        raise ConfigError(source, _in_order(problems))
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, lines))
    problems.extend(_semantic_problems(data, lines))
    if config is not None and (exposed := config.exposure_problem()) is not None:
        problems.append(ConfigProblem("listen", _line_of(("listen",), lines), exposed))
    if problems:
        raise ConfigError(source, _in_order(problems))
    assert config is not None  # for mypy: no problems means validated
    return config


def _in_order(problems: list[ConfigProblem]) -> list[ConfigProblem]:
    return sorted(problems, key=lambda p: (p.line or 0, p.path))


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)  # a larger file is refused without reading it all
    except OSError as exc:
        raise ConfigError(str(p), [ConfigProblem("", None, f"cannot read: {exc}")]) from exc
    return parse_config(raw, str(p))


def _pydantic_problems(exc: ValidationError, lines: Mapping[Loc, int]) -> Iterator[ConfigProblem]:
    for err in exc.errors():
        # pydantic puts the validator's name of a tagged/union branch in loc; keep real keys only.
        loc: Loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        kind = err["type"]
        if kind == "extra_forbidden":
            message = f"unknown key {loc[-1]!r} (a typo?)"
        elif kind == "missing":
            message = "required key is missing"
        else:
            message = err["msg"].removeprefix("Value error, ")
            secret = bool(loc) and loc[0] == "auth"  # a mistyped token is still a token
            if not secret and (
                kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error"
            ):
                message += f" (got {_shown(err.get('input'))})"
        yield ConfigProblem(_dotted(loc), _line_of(loc, lines), message)


def _shown(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _semantic_problems(
    data: Mapping[str, Any], lines: Mapping[Loc, int]
) -> Iterator[ConfigProblem]:
    """Cross-key checks. They read the raw mapping, defensively, so that they report alongside
    the per-key type errors instead of hiding behind them."""

    def problem(loc: Loc, message: str) -> ConfigProblem:
        return ConfigProblem(_dotted(loc), _line_of(loc, lines), message)

    def section(value: Any) -> Mapping[str, Any]:
        return value if isinstance(value, Mapping) else {}

    consumers = section(data.get("consumers"))
    names = set(consumers)
    listen = data.get("listen")
    if isinstance(listen, str):
        try:
            split_listen(listen)
        except ValueError as exc:
            yield problem(("listen",), str(exc))
    for kind, target in section(data.get("routing")).items():
        if isinstance(target, str) and target not in names:
            yield problem(("routing", kind), f"routes to {target!r}, which is not a consumer")
    audio_proxy = data.get("audio_proxy")
    if isinstance(audio_proxy, str) and audio_proxy not in names:
        yield problem(("audio_proxy",), f"{audio_proxy!r} is not a consumer")
    yield from _auth_problems(section(data.get("auth")), problem)
    gpu = section(data.get("gpu"))
    total = gpu.get("total_mib")
    margin = gpu.get("safety_margin_mib", GpuConfig().safety_margin_mib)
    if gpu.get("backend") == "static" and total is None:
        yield problem(("gpu", "backend"), "backend 'static' needs gpu.total_mib")
    for name, raw in consumers.items():
        c = section(raw)
        base: Loc = ("consumers", name)
        url = c.get("url")
        if isinstance(url, str) and (url_problem := check_url(url)) is not None:
            yield problem((*base, "url"), f"bad_consumer_url: {url_problem}")
        cost = c.get("vram_resident_mib")
        if _is_int(total) and _is_int(margin) and _is_int(cost) and cost > total - margin:
            yield problem(
                (*base, "vram_resident_mib"),
                f"{cost} MiB cannot fit on a {total} MiB GPU with a {margin} MiB safety margin",
            )
        coexist = c.get("can_coexist_with")
        for i, other in enumerate(coexist if isinstance(coexist, list) else []):
            if isinstance(other, str) and other not in names:
                yield problem((*base, "can_coexist_with", i), f"{other!r} is not a consumer")
            elif other == name:
                yield problem((*base, "can_coexist_with", i), "a consumer cannot list itself")
        is_command = c.get("type") == AdapterType.COMMAND.value
        if is_command and isinstance(c.get("unload"), Mapping) and c.get("load") is None:
            # Its unload stops the process; with no load nothing would ever start it again.
            yield problem((*base, "unload"), "type: command with an unload needs a load too")
        adapter_type = _adapter_type(c.get("type", AdapterType.GENERIC.value))
        for action_name in ("unload", "load"):
            action = c.get(action_name)
            if action is None:
                continue
            if adapter_type is not None and action_name not in registry_actions(adapter_type):
                # A key the type's adapter would not use: refused rather than silently ignored.
                yield problem(
                    (*base, action_name),
                    f"not applicable to type {adapter_type}: it uses its own {action_name} call "
                    f"(see docs/upstreams.md)",
                )
                continue
            if not isinstance(action, Mapping):
                continue
            if "command" in action and not is_command:
                yield problem(
                    (*base, action_name, "command"), "'command' actions need type: command"
                )
            if is_command and "command" not in action:
                yield problem((*base, action_name), "type: command needs a 'command' argv list")
        for kind in section(c.get("paths")):
            if not (isinstance(kind, str) and re.fullmatch(r"[a-z][a-z0-9_]*", kind)):
                yield problem((*base, "paths", kind), "kind names are lower-case words")
        models = _model_names(c.get("models"))
        for model in {m for m in models if models.count(m) > 1}:
            yield problem((*base, "models"), f"model {model!r} is listed twice")
        for alias, target in section(c.get("aliases")).items():
            if models and target not in models:
                yield problem((*base, "aliases", alias), f"{target!r} is not one of its models")
    warm = section(data.get("idle")).get("warm")
    for i, entry in enumerate(warm if isinstance(warm, list) else []):
        name, _, model = str(entry).partition("/")
        if name not in names:
            yield problem(("idle", "warm", i), f"{name!r} is not a consumer")
            continue
        models = _model_names(section(consumers[name]).get("models"))
        if model and models and model not in models:
            yield problem(("idle", "warm", i), f"{model!r} is not one of {name}'s models")


def _adapter_type(value: Any) -> AdapterType | None:
    try:
        return AdapterType(value)
    except ValueError:
        return None  # reported by the model's own validation


def registry_actions(kind: AdapterType) -> frozenset[str]:
    """Which of `unload:` / `load:` a type honours; its adapter says (adapters/base.py)."""
    from .adapters import registry_actions as of_adapter  # adapters import this module

    return of_adapter(kind)


def _model_names(models: Any) -> list[str]:
    """The names in a raw `models` list (plain names or mappings with a name)."""
    out = []
    for m in models if isinstance(models, list) else []:
        name = m.get("name") if isinstance(m, Mapping) else m
        if isinstance(name, str):
            out.append(name)
    return out


def _auth_problems(
    auth: Mapping[str, Any], problem: Callable[[Loc, str], ConfigProblem]
) -> Iterator[ConfigProblem]:
    """Each token names one caller: names and token values are unique (`auth.token`, the
    unnamed one, goes by DEFAULT_CALLER)."""
    names: dict[str, str] = {}
    secrets: dict[str, str] = {}
    single = auth.get("token")
    if isinstance(single, str):
        names[DEFAULT_CALLER] = secrets[single] = "auth.token"
    tokens = auth.get("tokens")
    for i, entry in enumerate(tokens if isinstance(tokens, list) else []):
        if not isinstance(entry, Mapping):
            continue
        here = f"auth.tokens.{i}"
        name, secret = entry.get("name"), entry.get("token")
        if isinstance(name, str) and names.setdefault(name, here) != here:
            yield problem(("auth", "tokens", i, "name"), f"{name!r} is taken by {names[name]}")
        if isinstance(secret, str) and secrets.setdefault(secret, here) != here:
            yield problem(
                ("auth", "tokens", i, "token"),
                f"the same token as {secrets[secret]}: each token names one caller",
            )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_url(url: str) -> str | None:
    """None when `url` is a usable upstream base URL, else what is wrong with it."""
    shown = repr(redact_url(url))  # the message may reach a log: no credentials in it
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{shown}: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"{shown}: scheme must be http or https"
    if not parts.hostname:
        return f"{shown}: no host"
    if parts.query or parts.fragment:
        return f"{shown}: no query or fragment allowed in a base URL"
    if port is not None and not 0 < port < 65536:
        return f"{shown}: bad port"
    return None
