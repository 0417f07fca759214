"""Log lines a client can cause, bounded: a flood of bad requests, disconnects or refused
connections can neither fill the disk nor drown the lines that matter.

`RateLimit` is a logging filter with a token bucket per message — its logger, level and format
string, so the same message about one client address or another counts as one — and one bucket
for all messages together. A burst passes, then a trickle; what was held back is counted and
said on the next line of that message that passes ("N similar lines suppressed"). `install`
puts it on the root logger's handlers (the daemon's stderr, the journal under systemd), so it
sees every line, aiohttp's and asyncio's included.

It limits every WARNING and ERROR, and every line at all of the loggers that speak for clients
(aiohttp's, asyncio's, the listener's and the relay's: one line per connection or request).
The broker's own INFO lines (a residency change, a reload) follow work that takes seconds on a
real card and are what an operator reads afterwards: they pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

# Loggers whose every line (any level) one request or connection can cause.
CLIENT_LOGGERS = ("aiohttp", "asyncio", "mgpumanager.relay.listener", "mgpumanager.relay.proxy")


@dataclass
class _Bucket:
    tokens: float
    at: float
    suppressed: int = 0


class RateLimit(logging.Filter):
    """Per message: `burst` lines, then one every 1/`per_message_s` seconds; all messages
    together: `total_burst`, then `total_per_s` a second. Injectable clock for tests."""

    def __init__(
        self,
        *,
        burst: int = 20,
        per_message_s: float = 0.2,
        total_burst: int = 200,
        total_per_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        max_messages: int = 4096,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.per_message_s = per_message_s
        self.total_burst = total_burst
        self.total_per_s = total_per_s
        self.clock = clock
        self.max_messages = max_messages
        self._buckets: dict[tuple[str, int, str], _Bucket] = {}
        self._total = _Bucket(float(total_burst), clock())
        self.suppressed = 0  # lines held back in all

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and not record.name.startswith(CLIENT_LOGGERS):
            return True
        now = self.clock()
        key = (record.name, record.levelno, str(record.msg))
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_messages:
                self._buckets.clear()  # many distinct messages: forget the quiet ones
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        _refill(bucket, now, self.per_message_s, self.burst)
        _refill(self._total, now, self.total_per_s, self.total_burst)
        if bucket.tokens < 1 or self._total.tokens < 1:
            bucket.suppressed += 1
            self.suppressed += 1
            return False
        bucket.tokens -= 1
        self._total.tokens -= 1
        if bucket.suppressed:
            record.msg = f"{record.getMessage()} ({bucket.suppressed} similar lines suppressed)"
            record.args = ()
            bucket.suppressed = 0
        return True


def _refill(bucket: _Bucket, now: float, per_s: float, cap: int) -> None:
    bucket.tokens = min(float(cap), bucket.tokens + (now - bucket.at) * per_s)
    bucket.at = now


_LIMIT = RateLimit()


def install(limit: RateLimit | None = None) -> RateLimit:
    """Put `limit` (default: the process's one) on every handler of the root logger."""
    limit = limit or _LIMIT
    for handler in logging.getLogger().handlers:
        if limit not in handler.filters:
            handler.addFilter(limit)
    return limit


def shown(text: str, limit: int = 200) -> str:
    """A client's string as a log line may quote it: on one line, bounded."""
    quoted = repr(text)
    return quoted if len(quoted) <= limit else quoted[:limit] + "..."
