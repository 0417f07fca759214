"""Which consumer serves which model, and what each model costs: the registry's `models` and
`aliases` first, then what the upstreams list themselves (Ollama's /api/tags, /v1/models of
OpenAI-style servers), re-read in the background.

Used to route requests that name a model (the OpenAI-compatible `/v1` routes, the Ollama API
with several Ollama consumers) and to cost a job by its model rather than by the consumer's
largest. Upstream lists are a cache: a failed refresh keeps the last good list and is logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from mgpumanager.registry import Config
from mgpumanager.upstreams.adapters import BaseAdapter
from mgpumanager.upstreams.model_names import model_identity, registry_entry, spelling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelOwner:
    model: str  # as clients name it (an alias stays an alias)
    consumer: str
    target: str  # the upstream's own name for it (the alias resolved)


class ModelCatalog:
    def __init__(
        self, config: Config, adapters: Mapping[str, BaseAdapter], *, refresh_s: float = 30.0
    ) -> None:
        self.config = config
        self.adapters = adapters
        self.refresh_s = refresh_s
        # consumer -> model -> size in MiB (None: unknown); absent: no list read (yet).
        self.upstream: dict[str, dict[str, int | None]] = {}
        self._task: asyncio.Task[None] | None = None

    # -- reading the upstreams ------------------------------------------------------------------

    async def refresh(self, names: list[str] | None = None) -> None:
        """Re-read the model lists of `names` (default: all), concurrently."""
        names = list(self.adapters) if names is None else names
        answers = await asyncio.gather(
            *(self.adapters[n].installed_models() for n in names), return_exceptions=True
        )
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, BaseException):
                log.debug("%s: model list not read: %s", name, answer)
            elif answer is not None:
                self.upstream[name] = answer

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="model-catalog")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- answers --------------------------------------------------------------------------------

    def owner(self, model: str, among: list[str] | None = None) -> ModelOwner | None:
        """The consumer that serves `model`: one whose registry lists it (or an alias of it)
        first, in registry order, else one whose upstream lists it under any spelling of the
        same model (model_names). `among` narrows the consumers asked (say, only those of type
        ollama). `target` is the name as the upstream lists it, where its list says."""
        names = [n for n in self.config.consumers if among is None or n in among]
        for name in names:
            consumer = self.config.consumers[name]
            entry = registry_entry(consumer, model)
            if entry is not None:
                return ModelOwner(model, name, self.listed_name(name, entry.name) or entry.name)
            if model in consumer.aliases:  # an alias of a model only its upstream lists
                target = consumer.aliases[model]
                return ModelOwner(model, name, self.listed_name(name, target) or target)
        for name in names:
            listed = self.listed_name(name, model)
            if listed is not None:
                return ModelOwner(model, name, listed)
        return None

    def listed_name(self, consumer: str, model: str) -> str | None:
        """How `consumer`'s upstream list spells `model` (None: not listed, or no list)."""
        listed = self.upstream.get(consumer)
        if not listed:
            return None
        return spelling(self.config.consumers[consumer].type, listed, model)

    def listed_size(self, consumer: str, model: str) -> int | None:
        """The upstream list's size for `model` in MiB, under any spelling of it."""
        name = self.listed_name(consumer, model)
        return None if name is None else self.upstream[consumer][name]

    def listing(self, among: list[str] | None = None) -> list[ModelOwner]:
        """Every model (and alias) of every consumer in `among`, each once, registry first:
        an upstream's `big:latest` is not listed again beside the registry's `big`."""
        seen: set[str] = set()
        out = []
        for name, c in self.config.consumers.items():
            if among is not None and name not in among:
                continue
            mine = {model_identity(c.type, m.name) for m in c.models}
            names = [m.name for m in c.models] + list(c.aliases)
            names += [
                m
                for m in sorted(self.upstream.get(name, {}))
                if model_identity(c.type, m) not in mine
            ]
            for model in names:
                if model not in seen:
                    seen.add(model)
                    out.append(ModelOwner(model, name, c.aliases.get(model, model)))
        return out

    def size_mib(self, consumer: str, model: str) -> int | None:
        """VRAM one model needs: the registry's `vram_mib`, else the upstream's own figure."""
        entry = registry_entry(self.config.consumers[consumer], model)
        if entry is not None and entry.vram_mib is not None:
            return entry.vram_mib
        return self.listed_size(consumer, entry.name if entry is not None else model)

    def has(self, consumer: str, model: str) -> bool | None:
        """Whether the upstream lists `model` under any spelling (None: it keeps no list, or it
        was not read)."""
        listed = self.upstream.get(consumer)
        if listed is None:
            return None
        entry = registry_entry(self.config.consumers[consumer], model)
        target = entry.name if entry is not None else model
        return spelling(self.config.consumers[consumer].type, listed, target) is not None
