"""Every route the broker serves, in one table: the main listener's (`listen`) and a front
door's. Handlers live with their dialect (ollama, openai, upstream, facade, dashboard); this
module only says which path goes where. Order matters where patterns overlap: the OpenAI paths
come before the facade's `/v1/{kind}`, so an OpenAI path wins over a kind of the same name."""

from __future__ import annotations

from aiohttp import web

from mgpumanager.api import audio_lists, dashboard, facade, ollama, openai, upstream
from mgpumanager.registry import KINDS, Config
from mgpumanager.upstreams.adapters import OPENAI_GPU_PATHS


def add_main_routes(router: web.UrlDispatcher, config: Config) -> None:
    """The routes of the main listener."""
    # Ollama's API at the root (GET also answers HEAD).
    router.add_get("/", ollama.root)
    router.add_get("/api/version", ollama.ollama_default)
    router.add_get("/api/tags", ollama.ollama_list)
    router.add_get("/api/ps", ollama.ollama_list)
    for path in ollama.OLLAMA_RUN:
        router.add_post(path, ollama.ollama_run)
    for path in ollama.OLLAMA_MANAGE:
        if path == "/api/delete":
            router.add_delete(path, ollama.ollama_manage)
        else:
            router.add_post(path, ollama.ollama_manage)
    router.add_route("HEAD", "/api/blobs/{digest}", ollama.ollama_default)
    router.add_post("/api/blobs/{digest}", ollama.ollama_default)

    # The OpenAI-compatible /v1.
    router.add_get("/v1/models", openai.openai_models)
    router.add_get("/v1/models/{model:.+}", openai.openai_model)
    router.add_get("/v1/audio/models", audio_lists.audio_models)
    router.add_get("/v1/audio/voices", audio_lists.audio_voices)
    for path in sorted(OPENAI_GPU_PATHS):
        router.add_post(path, openai.openai_run)

    # Every consumer's own API.
    below = upstream.consumer_api(upstream.UPSTREAM_PREFIX)
    router.add_route("*", "/upstream/{name}", below)
    router.add_route("*", "/upstream/{name}/{tail:.*}", below)

    # The broker's own: jobs by kind, the audio proxy, status, steering.
    kinds = "|".join(sorted(set(KINDS) | {k for c in config.consumers.values() for k in c.paths}))
    router.add_post(f"/v1/{{kind:{kinds}}}", facade.kind_job)
    router.add_get("/audio/{tail:.+}", facade.audio)
    router.add_get("/v1/status", facade.status)
    router.add_get("/v1/events", facade.events)
    router.add_get("/healthz", facade.healthz)
    router.add_get("/metrics", facade.metrics)
    router.add_post("/v1/admin/consumers/{name}/{action:unload|load}", facade.admin)

    # The dashboard's page (and at / for browsers: ollama.root).
    router.add_get("/ui", dashboard.to_page)
    router.add_get("/ui/", dashboard.page)
    router.add_get("/ui/{name}", dashboard.asset)


def add_front_door_routes(router: web.UrlDispatcher, name: str) -> None:
    """The routes of consumer `name`'s front door: its own API at the root, served by the same
    code as /upstream/<name>/."""
    router.add_route("*", "/{tail:.*}", upstream.consumer_api("/", name))
