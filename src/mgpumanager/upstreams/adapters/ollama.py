"""`type: ollama` — Ollama's own protocol.

Residency from `GET /api/ps`. Unload is `keep_alive: 0` for every resident model, which Ollama
answers BEFORE the memory is freed (and only after requests in flight end), so `unloaded` polls
/api/ps. Load is an empty generate for each configured model; without models, the first job
loads lazily. The registry's `unload:` / `load:` do not apply: Ollama's calls are its protocol.
"""

from __future__ import annotations

from mgpumanager.errors import Dialect
from mgpumanager.registry import HealthConfig, HttpCall
from mgpumanager.upstreams.adapters.base import BaseAdapter, ResidencyReport
from mgpumanager.upstreams.model_names import ollama_identity

MIB = 1024 * 1024
# Ollama's own routes that run a model (the rest of its API manages models: no GPU).
OLLAMA_MODEL_ROUTES = frozenset(
    ("POST", path) for path in ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings")
)


class OllamaAdapter(BaseAdapter):
    default_health = HealthConfig(path="/api/version")
    default_paths = {"llm": HttpCall(path="/api/generate")}
    model_routes = OLLAMA_MODEL_ROUTES

    @property
    def has_load(self) -> bool:
        return bool(self.config.preload_models)

    per_model = True
    unloads_itself = True
    openai_routes = True
    own_dialect = Dialect.OLLAMA

    def model_key(self, model: str) -> str:
        # Its implied tag, namespace and registry (model_names): `big` is `big:latest`.
        return ollama_identity(model)

    async def installed_models(self) -> dict[str, int | None]:
        """GET /api/tags: every pulled model with its size on disk (close to its VRAM cost)."""
        tags = await self.request_json("GET", "/api/tags", timeout_s=self.health_config.timeout_s)
        models = tags.get("models") if isinstance(tags, dict) else None
        out: dict[str, int | None] = {}
        for m in models if isinstance(models, list) else []:
            if isinstance(m, dict) and (m.get("name") or m.get("model")):
                size = m.get("size")
                mib = size // MIB if isinstance(size, int) and size > 0 else None
                out[str(m.get("name") or m.get("model"))] = mib
        return out

    async def resident_sizes(self) -> dict[str, int | None]:
        """/api/ps: each resident model with `size_vram` (Ollama's own estimate) in MiB."""
        out: dict[str, int | None] = {}
        for m in await self.ps_models():
            if isinstance(m, dict) and (m.get("name") or m.get("model")):
                size = m.get("size_vram")
                mib = -(-size // MIB) if isinstance(size, int) and size > 0 else None
                out[str(m.get("name") or m.get("model"))] = mib
        return out

    async def resident_models(self) -> list[str]:
        return list(await self.resident_sizes())

    async def residency(self) -> ResidencyReport:
        sizes = await self.resident_sizes()
        held = sum(mib for mib in sizes.values() if mib is not None)
        return ResidencyReport(
            bool(sizes), detail=", ".join(sizes), held_mib=held or None, models=sizes
        )

    async def unload(self) -> None:
        for model in await self.resident_models():
            await self.unload_model(model)

    async def unload_model(self, model: str) -> None:
        await self.request_json(
            "POST",
            "/api/generate",
            body={"model": model, "keep_alive": 0},
            timeout_s=self.config.unload_timeout_s,
        )

    async def load_model(self, model: str) -> None:
        await self.request_json(
            "POST",
            "/api/generate",
            body={"model": model, "stream": False},
            timeout_s=self.config.load_timeout_s,
        )

    async def unloaded(self) -> bool:
        return not await self.resident_models()

    async def load(self) -> None:
        for model in self.config.preload_models:
            await self.load_model(model)
