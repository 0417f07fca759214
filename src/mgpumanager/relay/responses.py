"""The only place a BrokerError becomes an HTTP answer."""

from __future__ import annotations

import json

from aiohttp import web

from mgpumanager.errors import BrokerError, Dialect


def error_response(err: BrokerError, dialect: Dialect = Dialect.ENVELOPE) -> web.Response:
    """`err` as an answer in `dialect` (the envelope, Ollama's or OpenAI's error shape)."""
    return web.Response(
        status=err.status,
        body=json.dumps(err.body(dialect)).encode(),
        content_type="application/json",
        headers=err.headers,
    )
