"""`type: speaches` — OpenAI-style STT/TTS whose models are listed, loaded and unloaded under
`/api/ps`. A DELETE answers 409 while the model is in use: retried until unload_timeout_s. The
registry's `unload:` / `load:` do not apply: the /api/ps calls are its protocol."""

from __future__ import annotations

import asyncio
from urllib.parse import quote

from mgpumanager.errors import BrokerError, ErrorCode
from mgpumanager.registry import HttpCall
from mgpumanager.upstreams.adapters.base import BaseAdapter, ResidencyReport, UpstreamStatus


class SpeachesAdapter(BaseAdapter):
    default_paths = {
        "stt": HttpCall(path="/v1/audio/transcriptions"),
        "tts": HttpCall(path="/v1/audio/speech"),
    }
    retry_s = 0.2

    @property
    def has_load(self) -> bool:
        return bool(self.config.preload_models)

    per_model = True
    unloads_itself = True
    openai_routes = True

    async def loaded_models(self) -> list[str]:
        models = await self.ps_models()
        # speaches answers a list of ids; tolerate objects with an "id" as well.
        return [m if isinstance(m, str) else str(m.get("id")) for m in models if _named(m)]

    async def residency(self) -> ResidencyReport:
        models = await self.loaded_models()
        sizes: dict[str, int | None] = dict.fromkeys(models)  # speaches gives no sizes
        return ResidencyReport(bool(models), detail=", ".join(models), models=sizes)

    async def unload(self) -> None:
        await self._unload(None)

    async def unload_model(self, model: str) -> None:
        await self._unload(model)

    async def _unload(self, only: str | None) -> None:
        timeout_s = self.config.unload_timeout_s
        model = ""
        try:
            async with asyncio.timeout(timeout_s):
                for model in [only] if only else await self.loaded_models():
                    while True:
                        try:
                            await self.request_json(
                                "DELETE",
                                f"/api/ps/{model_path(model, self.name)}",
                                timeout_s=5.0,
                                ok=(200, 404),
                            )
                            break
                        except UpstreamStatus as exc:
                            if exc.http_status != 409:
                                raise
                            await asyncio.sleep(self.retry_s)  # in use: ask again
        except TimeoutError:
            # A bare TimeoutError would escape the residency layer (it handles BrokerError)
            # and leave the consumer stuck in `unloading`.
            raise BrokerError(
                ErrorCode.EVICTION_FAILED,
                f"{self.name}: {model or 'its models'} still in use (409) or not answering "
                f"after unload_timeout_s ({timeout_s:g} s)",
                consumer=self.name,
            ) from None

    async def unloaded(self) -> bool:
        return not await self.loaded_models()

    async def load(self) -> None:
        for model in self.config.preload_models:
            await self.load_model(model)

    async def load_model(self, model: str) -> None:
        await self.request_json(
            "POST",
            f"/api/ps/{model_path(model, self.name)}",
            timeout_s=self.config.load_timeout_s,
            ok=(200, 201, 409),
        )


def _named(model: object) -> bool:
    return isinstance(model, str) or (isinstance(model, dict) and model.get("id") is not None)


def model_path(model: str, consumer: str) -> str:
    """A model id as a path below /api/ps/ (speaches ids hold a `/`: `Systran/faster-whisper`).
    The id may come from a client: a `.` or `..` segment, or an empty one, would make it
    another route once the URL is normalised, so it is refused."""
    segments = model.split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise BrokerError(
            ErrorCode.BAD_REQUEST, f"not a model id: {model[:200]!r}", consumer=consumer
        )
    return "/".join(quote(s, safe="") for s in segments)
