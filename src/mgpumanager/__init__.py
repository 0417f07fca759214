"""mgpumanager: one scheduler and VRAM manager in front of every inference service on a GPU box."""

from __future__ import annotations

__version__ = "0.1.0"
