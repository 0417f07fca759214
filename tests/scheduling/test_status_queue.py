"""/v1/status lists at most WAITING_SHOWN waiting jobs (the oldest), while queue_depth counts
them all: listing a queue of 10,000 would hold the event loop for tens of milliseconds."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from conftest import Upstream, consumer, make_config, running_broker, wait_for
from mgpumanager.status import WAITING_SHOWN


async def test_status_lists_the_oldest_waiting_jobs_and_counts_them_all(
    upstream: Upstream,
) -> None:
    release = asyncio.Event()

    async def synthesize(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    upstream.route("POST", "/api/synthesize", synthesize)
    await upstream.start()
    config = make_config(
        {"mvoice": consumer(upstream.url)},
        routing={"tts": "mvoice"},
        scheduler={"max_queue": 1000},
    )
    total = WAITING_SHOWN + 6
    connector = aiohttp.TCPConnector(limit=0)
    async with running_broker(config) as server, aiohttp.ClientSession(connector=connector) as s:
        jobs = [
            asyncio.create_task(s.post(f"{server.url}/v1/tts", json={"n": i})) for i in range(total)
        ]
        core = server.broker.lease.core
        await wait_for(lambda: core.queue_depth == total - 1, what="all but one queued")
        status = server.broker.status()
        assert status.scheduler.queue_depth == total - 1
        waiting = status.scheduler.waiting
        assert len(waiting) == WAITING_SHOWN
        assert [j.job for j in waiting] == sorted(j.job for j in waiting)  # oldest first
        assert waiting[0].job == min(core.waiting)
        release.set()
        for response in await asyncio.gather(*jobs):
            assert response.status == 200
            response.release()
