"""`type: vllm` — vLLM's sleep mode (`--enable-sleep-mode`): unload = `POST /sleep?level=1`
(level 1 keeps the weights in CPU RAM), load = `POST /wake_up`, residency from `GET
/is_sleeping`. The registry's `unload:` / `load:` replace those two calls (another sleep level,
say)."""

from __future__ import annotations

from mgpumanager.registry import Action, HttpCall
from mgpumanager.upstreams.adapters.base import BaseAdapter, ResidencyReport


class VllmAdapter(BaseAdapter):
    default_paths = {"llm": HttpCall(path="/v1/completions")}
    loads_itself = True
    unloads_itself = True
    openai_routes = True

    async def residency(self) -> ResidencyReport:
        return ResidencyReport(not await self._sleeping())

    async def _sleeping(self) -> bool:
        answer = await self.request_json(
            "GET", "/is_sleeping", timeout_s=self.health_config.timeout_s
        )
        return bool((answer or {}).get("is_sleeping"))

    async def unload(self) -> None:
        action = self.config.unload or Action(path="/sleep?level=1")
        await self.call(action, timeout_s=self.config.unload_timeout_s)

    async def unloaded(self) -> bool:
        return await self._sleeping()

    async def load(self) -> None:
        action = self.config.load or Action(path="/wake_up")
        await self.call(action, timeout_s=self.config.load_timeout_s)
