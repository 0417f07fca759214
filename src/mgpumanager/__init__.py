"""mgpumanager: one scheduler and VRAM manager in front of every inference service on a GPU box.

The public surface; everything else is an implementation module. Re-exports are lazy (PEP 562)
so that `python -m mgpumanager.sim.whisper` and the CLI's `check-config` stay light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mgpumanager.api.app import make_app
    from mgpumanager.broker import Broker
    from mgpumanager.daemon import Server, start_server
    from mgpumanager.errors import ERROR_TABLE, BrokerError, ErrorCode
    from mgpumanager.registry import Config, ConfigError, ConfigProblem, load_config, parse_config

_EXPORTS = {
    "Server": ".daemon",
    "make_app": ".api.app",
    "start_server": ".daemon",
    "Broker": ".broker",
    "Config": ".registry",
    "ConfigError": ".registry",
    "ConfigProblem": ".registry",
    "load_config": ".registry",
    "parse_config": ".registry",
    "ERROR_TABLE": ".errors",
    "BrokerError": ".errors",
    "ErrorCode": ".errors",
}

__all__ = [
    "ERROR_TABLE",
    "Broker",
    "BrokerError",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "ErrorCode",
    "Server",
    "__version__",
    "load_config",
    "make_app",
    "parse_config",
    "start_server",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mgpumanager' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
