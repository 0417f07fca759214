"""Secrets out of the log: aiohttp's own records are rewritten before any handler sees them.

A request aiohttp cannot parse (a NUL byte after the bearer token, say) is logged by aiohttp
with the offending header line quoted, token included. Filters on aiohttp's loggers redact
credentials in the message and in the exception text: header values of Authorization,
Proxy-Authorization, Cookie and X-Api-Key, anything after `Bearer`/`Basic`, and the user
information of URLs (`//user:password@host`).
"""

from __future__ import annotations

import logging
import re

# The header line as aiohttp quotes it ends at the line's end (a repr() keeps it on one line).
_SECRET_HEADER = re.compile(
    r"(?i)\b((?:proxy-)?authorization|cookie|set-cookie|x-api-key)(\s*:\s*)[^\r\n]*"
)
_SCHEME_CREDENTIAL = re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s'\"]+")
_URL_USERINFO = re.compile(r"//[^/\s@'\"]+@")

REDACTED = "<redacted>"

# aiohttp's loggers that can quote what a client sent.
AIOHTTP_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal")


def redact_text(text: str) -> str:
    """`text` with credentials replaced by `<redacted>` (see the module docstring)."""
    text = _SECRET_HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _SCHEME_CREDENTIAL.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    return _URL_USERINFO.sub(f"//{REDACTED}@", text)


class RedactSecrets(logging.Filter):
    """Rewrites a record whose message or exception text holds a credential: the message is
    redacted and formatted once, and the traceback becomes its redacted text."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        exc_text = record.exc_text
        if record.exc_info is not None and exc_text is None:
            exc_text = logging.Formatter().formatException(record.exc_info)
        clean_exc = None if exc_text is None else redact_text(exc_text)
        if clean != message or clean_exc != exc_text:
            record.msg, record.args = clean, ()
            record.exc_info, record.exc_text = None, clean_exc
        return True


_FILTER = RedactSecrets()


def install_log_redaction() -> None:
    """Put the filter on aiohttp's loggers (idempotent: a logger holds a filter once)."""
    for name in AIOHTTP_LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)
