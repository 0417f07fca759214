"""`type: generic` — the declarative adapter of the original brief (mVoice, or any HTTP service):
health, unload and load are the HTTP calls written in the registry. It cannot tell what is
resident; the GPU reading decides."""

from __future__ import annotations

from mgpumanager.upstreams.adapters.base import BaseAdapter


class GenericAdapter(BaseAdapter):
    """Everything comes from the registry; BaseAdapter's plumbing does the rest."""
