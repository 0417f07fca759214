"""What a model name means: one rule, per upstream type, for every place that compares names
(routing, the model catalog, costs, residency records).

- **Ollama** names a model `host/namespace/model:tag`, with `registry.ollama.ai`, `library` and
  `latest` implied where they are left out, and compares names without case. So `big`,
  `big:latest`, `library/big`, `Big` and `registry.ollama.ai/library/big:latest` are one model,
  whose identity is `big:latest`; `someone/big` is another (`someone/big:latest`). A digest
  (`@sha256:...`) names the same model. Servers that speak Ollama's API but list names without
  the tag (`big`) are the same case: what they list and what a client asks for meet here.
- **Every other type** (vLLM, speaches, OpenAI-style servers): a model id is itself, exactly
  (`Systran/faster-whisper-small` is not `systran/faster-whisper-small` to them).
- **Aliases** (the registry's `aliases`) are the registry's own names for a model: resolved
  first, then the rule above applies to what they name.

The broker keeps its per-model records under the identity, and sends the upstream the name as
the upstream itself lists it (`spelling`), so a server that knows only `big` is asked for `big`.
"""

from __future__ import annotations

from collections.abc import Iterable

from mgpumanager.registry import AdapterType, ConsumerConfig, ModelEntry

OLLAMA_HOST = "registry.ollama.ai"
OLLAMA_NAMESPACE = "library"
OLLAMA_TAG = "latest"


def ollama_identity(name: str) -> str:
    """`big` -> `big:latest`; `registry.ollama.ai/library/big:latest` -> `big:latest`;
    `someone/big` -> `someone/big:latest`; `hf.co/org/repo:Q4` -> `hf.co/org/repo:q4`."""
    text = name.strip().lower().split("@", 1)[0]
    slash, colon = text.rfind("/"), text.rfind(":")
    base, tag = (text[:colon], text[colon + 1 :]) if colon > slash else (text, "")
    parts = [p for p in base.split("/") if p]
    if len(parts) == 1:
        parts = [OLLAMA_HOST, OLLAMA_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [OLLAMA_HOST, *parts]
    if parts and parts[0] == OLLAMA_HOST:
        parts = parts[1:]
        if len(parts) == 2 and parts[0] == OLLAMA_NAMESPACE:
            parts = parts[1:]
    return "/".join(parts) + ":" + (tag or OLLAMA_TAG)


def model_identity(kind: AdapterType, name: str) -> str:
    """The one name every spelling of `name` shares on an upstream of type `kind`."""
    if kind is AdapterType.OLLAMA:
        return ollama_identity(name)
    return name


def same_model(kind: AdapterType, a: str, b: str) -> bool:
    return a == b or model_identity(kind, a) == model_identity(kind, b)


def spelling(kind: AdapterType, names: Iterable[str], wanted: str) -> str | None:
    """The name among `names` (an upstream's list) that is the model `wanted`: the exact one
    first, else one with the same identity; None: none of them is."""
    names = list(names)
    if wanted in names:
        return wanted
    identity = model_identity(kind, wanted)
    return next((n for n in names if model_identity(kind, n) == identity), None)


def registry_entry(consumer: ConsumerConfig, model: str) -> ModelEntry | None:
    """The registry's `models` entry for `model` as a client names it (an alias too) or as the
    upstream lists it: the registry's `llama3` is Ollama's `llama3:latest`."""
    entry = consumer.model_entry(model)
    if entry is not None:
        return entry
    identity = model_identity(consumer.type, consumer.aliases.get(model, model))
    return next(
        (m for m in consumer.models if model_identity(consumer.type, m.name) == identity), None
    )
