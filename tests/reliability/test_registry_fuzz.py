"""Mutated registries: whatever the bytes, the loader answers a Config or a ConfigError whose
every problem has a key path or a line; never another exception, never a hang.

The mutations start from the shipped registries and flip bytes, delete and duplicate spans,
and splice in YAML that has broken loaders before (anchors, aliases, recursion, tags, deep
nesting, huge numbers, impossible dates, other encodings)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mgpumanager.registry import Config, ConfigError, parse_config
from mgpumanager.registry.paths import demo_registry

ROOT = Path(__file__).resolve().parents[2]
SEEDS = [path.read_bytes() for path in (ROOT / "config" / "consumers.yaml", demo_registry())]

SNIPPETS = [
    b"&a ",
    b"*a",
    b"*undefined",
    b"<<: *a\n",
    b"<<: [*a, *a]\n",
    b"&r {self: *r}",
    b"&l [*l]",
    b"!!python/object/apply:os.system [echo]",
    b"!!binary AAAA",
    b"!!set {a, b}",
    b"!!omap [a: 1]",
    b"!!timestamp x",
    b"!custom 1",
    b"? [a, b]\n: c\n",
    b"? {a: 1}\n: c\n",
    b"9" * 5000,
    b"0x" + b"f" * 200,
    b"1:2:3:4:5:6:7:8:9",
    b"-0b" + b"1" * 100,
    b"1e99999",
    b".nan",
    b"-.inf",
    b"2001-02-30",
    b"2001-12-14t21:59:43.10-99:99",
    b"[" * 200,
    b"{a: " * 100,
    b"]}" * 5,
    b"~",
    b"null",
    b"\t",
    b"\x00",
    b"\xff\xfe",
    b"\xef\xbb\xbf",
    b"\xc3\x28",
    b"\r\n",
    b"---\n",
    b"...\n",
    b"%YAML 1.1\n",
    b"%TAG ! tag:x,2000:\n",
    b"'",
    b'"\\x',
    b"|\n",
    b">-\n",
    b"- ",
    b": ",
    b"#",
    b"listen: 9470\n",
    b"listen: 0.0.0.0:1\n",
    b"health: {path: no-slash}\n",
    b"auth: {tokens: [{name: a, token: b}, {name: a, token: b}]}\n",
    b"consumers: {}\n",
    b"routing: {tts: nobody}\n",
    b"url: http://u:p@h:99999\n",
    b"1: 2\n",
    b"true: false\n",
]

position = st.integers(min_value=0, max_value=1 << 20)
mutation = st.one_of(
    st.tuples(st.just("flip"), position, st.integers(0, 255)),
    st.tuples(st.just("delete"), position, st.integers(1, 64)),
    st.tuples(st.just("duplicate"), position, st.integers(1, 256), position),
    st.tuples(st.just("insert"), position, st.sampled_from(SNIPPETS)),
)


def mutate(raw: bytes, steps: list[tuple[object, ...]]) -> bytes:
    data = bytearray(raw)
    for step in steps:
        kind, at = step[0], int(step[1]) % (len(data) + 1)  # type: ignore[call-overload]
        if kind == "flip" and at < len(data):
            data[at] = int(step[2])  # type: ignore[call-overload]
        elif kind == "delete":
            del data[at : at + int(step[2])]  # type: ignore[call-overload]
        elif kind == "duplicate":
            span = bytes(data[at : at + int(step[2])])  # type: ignore[call-overload]
            to = int(step[3]) % (len(data) + 1)  # type: ignore[call-overload]
            data[to:to] = span
        elif kind == "insert":
            snippet = step[2]
            assert isinstance(snippet, bytes)
            data[at:at] = snippet
    return bytes(data)


@settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,  # the same 1,000 registries on every run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(seed=st.sampled_from(SEEDS), steps=st.lists(mutation, min_size=1, max_size=4))
def test_a_mutated_registry_is_a_config_or_a_list_of_located_problems(
    seed: bytes, steps: list[tuple[object, ...]]
) -> None:
    raw = mutate(seed, steps)
    try:
        config = parse_config(raw, "fuzzed.yaml")
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.path or problem.line is not None, problem
            assert problem.line is None or problem.line >= 1, problem
            assert problem.message, problem
        assert str(exc).startswith("fuzzed.yaml: ")
    else:
        assert isinstance(config, Config)
