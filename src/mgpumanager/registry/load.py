"""Reading the registry: `load_config(path)` returns a validated `Config` or raises
`ConfigError` listing *every* problem, each with its key path
(`consumers.ollama.vram_resident_mib`), its line in the file, and what is wrong. The CLI's
`check-config`, `serve` and SIGHUP reload all go through it.

The file is hostile input until proven otherwise: it must be UTF-8, at most `MAX_BYTES`, nested
at most `MAX_DEPTH` levels, and its aliases may not expand past `MAX_VALUES` values (a 900-byte
"billion laughs" file is refused while composing, before anything is expanded). Anything else
the YAML library or Python would choke on (recursive anchors, 5,000-digit integers, a 30th of
February) is a problem with a line, never a traceback.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mgpumanager.registry.checks import cross_key_problems
from mgpumanager.registry.models import Config


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
    problems.extend(
        cross_key_problems(
            data, lambda loc, message: ConfigProblem(_dotted(loc), _line_of(loc, lines), message)
        )
    )
    for loc, exposed in config.exposure_problems() if config is not None else []:
        problems.append(ConfigProblem(_dotted(loc), _line_of(loc, lines), exposed))
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


_BRANCH = re.compile(r"[\w-]+\[.*\]", re.DOTALL)


def _pydantic_problems(exc: ValidationError, lines: Mapping[Loc, int]) -> Iterator[ConfigProblem]:
    for err in exc.errors():
        # pydantic puts the validator's name of a tagged/union branch in loc (`function-after[
        # ...]`); keep real keys only, a key of the file's with a "[" in it too.
        loc: Loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and _BRANCH.fullmatch(p)))
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
