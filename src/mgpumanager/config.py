"""The registry (`config/consumers.yaml`): one pydantic model per section, defined once.

`load_config(path)` returns a validated `Config` or raises `ConfigError` listing *every*
problem, each with its key path (`consumers.ollama.vram_resident_mib`), its line in the file,
and what is wrong. The CLI's `check-config`, `serve` and SIGHUP reload all go through it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
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


class HttpCall(_Model):
    """An HTTP call to a consumer: `{method, path, body}`."""

    method: HttpMethod = "POST"
    path: str
    body: Any = None

    @field_validator("path")
    @classmethod
    def _path_absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v


class Action(_Model):
    """How to unload or load a consumer: an HTTP call, or (type `command`) an argv list."""

    method: HttpMethod = "POST"
    path: str | None = None
    body: Any = None
    command: list[str] | None = None
    timeout_s: PositiveFloat = 60.0

    @model_validator(mode="after")
    def _one_kind(self) -> Action:
        if (self.path is None) == (self.command is None):
            raise ValueError("give exactly one of 'path' (HTTP call) or 'command' (argv list)")
        if self.path is not None and not self.path.startswith("/"):
            raise ValueError("path must start with '/'")
        if self.command is not None and not self.command:
            raise ValueError("command must not be empty")
        return self


class HealthConfig(_Model):
    method: HttpMethod = "GET"
    path: str = "/health"
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
    affinity_wait_s: float = Field(default=10.0, ge=0)
    max_batch: int = Field(default=8, ge=1)
    allow_priority_header: bool = False
    drain_timeout_s: PositiveFloat = 30.0


class IdleConfig(_Model):
    # Consumers (or consumer/model) brought back when the GPU has been idle for warm_after_s.
    warm: list[str] = []
    warm_after_s: PositiveFloat = 30.0


class AuthConfig(_Model):
    # When set, every route but /healthz needs `Authorization: Bearer <token>`.
    token: SecretStr | None = None


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

    @property
    def listen_host_port(self) -> tuple[str, int]:
        return split_listen(self.listen)

    def coexist(self, a: str, b: str) -> bool:
        """`can_coexist_with` is symmetric: one side listing the other is enough."""
        return b in self.consumers[a].can_coexist_with or a in self.consumers[b].can_coexist_with


def split_listen(listen: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[?([^\]]*)\]?:(\d{1,5})", listen)
    if m is None or not 0 <= int(m.group(2)) <= 65535:
        raise ValueError(f"listen must be HOST:PORT, got {listen!r}")
    return m.group(1), int(m.group(2))


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


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value if isinstance(key, yaml.ScalarNode) else str(key.value)
            lines[(*loc, k)] = key.start_mark.line + 1
            _walk(value, (*loc, k), lines)
            lines[(*loc, k)] = key.start_mark.line + 1  # the key's line, not the value's
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*loc, i), lines)


def _line_of(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return lines.get(())


def _dotted(loc: Loc) -> str:
    return ".".join(str(p) for p in loc)


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(source, [ConfigProblem("", line, f"not valid YAML: {exc}")]) from exc
    lines: dict[Loc, int] = {}
    if node is not None:
        _walk(node, (), lines)
    if not isinstance(data, dict):
        raise ConfigError(source, [ConfigProblem("", 1, "the registry must be a YAML mapping")])
    problems: list[ConfigProblem] = []
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, lines))
    problems.extend(_semantic_problems(data, lines))
    problems.sort(key=lambda p: (p.line or 0, p.path))
    if problems:
        raise ConfigError(source, problems)
    assert config is not None  # for mypy: no problems means validated
    return config


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [ConfigProblem("", None, f"cannot read: {exc}")]) from exc
    return parse_config(text, str(p))


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
            message = err["msg"]
            if kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
                message += f" (got {err.get('input')!r})"
        yield ConfigProblem(_dotted(loc), _line_of(loc, lines), message)


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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_url(url: str) -> str | None:
    """None when `url` is a usable upstream base URL, else what is wrong with it."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{url!r}: {exc}"
    if parts.scheme not in ("http", "https"):
        return f"{url!r}: scheme must be http or https"
    if not parts.hostname:
        return f"{url!r}: no host"
    if parts.query or parts.fragment:
        return f"{url!r}: no query or fragment allowed in a base URL"
    if port is not None and not 0 < port < 65536:
        return f"{url!r}: bad port"
    return None
