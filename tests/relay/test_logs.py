"""The rate limit on log lines: a burst per message, then a trickle, the held-back lines counted
on the next one that passes; a limit across all messages; on a fake clock."""

from __future__ import annotations

import logging

from mgpumanager.relay.logs import RateLimit, install, shown


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def record(msg: str, *args: object, name: str = "aiohttp.server") -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)


def test_a_burst_then_a_trickle_then_the_count() -> None:
    clock = Clock()
    limit = RateLimit(burst=3, per_message_s=1.0, total_burst=100, total_per_s=100, clock=clock)
    passed = [limit.filter(record("from %s", f"10.0.0.{i}")) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7  # one message, whatever the address
    assert limit.filter(record("another message"))  # its own bucket
    clock.t = 1.0
    again = record("from %s", "10.0.0.99")
    assert limit.filter(again)
    assert again.getMessage() == "from 10.0.0.99 (7 similar lines suppressed)"
    assert not limit.filter(record("from %s", "x"))
    assert limit.suppressed == 8


def test_all_messages_together_are_bounded() -> None:
    clock = Clock()
    limit = RateLimit(burst=5, per_message_s=5, total_burst=10, total_per_s=2, clock=clock)
    passed = sum(limit.filter(record(f"distinct message {i}")) for i in range(100))
    assert passed == 10
    clock.t = 1.0
    passed = sum(limit.filter(record(f"later message {i}")) for i in range(100))
    assert passed == 2


def test_the_brokers_own_info_lines_pass_and_client_loggers_are_limited_at_every_level() -> None:
    limit = RateLimit(burst=1, per_message_s=0.01, clock=Clock())
    info = [
        logging.LogRecord("mgpumanager.residency", logging.INFO, __file__, 1, "swap", (), None)
        for _ in range(5)
    ]
    assert all(limit.filter(r) for r in info)
    left = [
        logging.LogRecord("mgpumanager.relay.proxy", logging.INFO, __file__, 1, "left", (), None)
        for _ in range(5)
    ]
    assert [limit.filter(r) for r in left] == [True, False, False, False, False]
    warn = [
        logging.LogRecord("mgpumanager.api.app", logging.WARNING, __file__, 1, "w", (), None)
        for _ in range(3)
    ]
    assert [limit.filter(r) for r in warn] == [True, False, False]


def test_install_puts_it_on_the_root_handlers_once() -> None:
    handler = logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        limit = install(RateLimit())
        install(limit)
        assert handler.filters.count(limit) == 1
    finally:
        root.removeHandler(handler)


def test_a_clients_string_is_quoted_on_one_line_and_bounded() -> None:
    assert shown("/a\nb") == "'/a\\nb'"
    assert len(shown("x" * 1000)) == 203
