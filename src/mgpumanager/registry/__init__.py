"""The registry (`config/consumers.yaml`): what the broker is told about the box.

- `models`: one pydantic model per section, defined once, and the per-type tables the adapters
  and the checks both read;
- `load`: reading a file into those models, every problem listed by key path and line;
- `checks`: the cross-key checks no single model can make (a consumer that fits on the card,
  `unload`/`load` keys its type honours, addresses and tokens).

Everything here is pure data and parsing: no I/O beyond reading the file, no aiohttp.
"""

from mgpumanager.registry.checks import check_url, registry_actions
from mgpumanager.registry.load import ConfigError, ConfigProblem, Loc, load_config, parse_config
from mgpumanager.registry.models import *  # noqa: F403
from mgpumanager.registry.models import __all__ as _models

__all__ = [
    *_models,
    "ConfigError",
    "ConfigProblem",
    "Loc",
    "check_url",
    "load_config",
    "parse_config",
    "registry_actions",
]
