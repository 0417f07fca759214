"""Residency of a fake's model, as the fake itself sees it (not what the GPU reading shows)."""

from __future__ import annotations

import enum


class ModelState(enum.StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"  # the service let go of it; the ledger may still show the memory
    FAILED = "failed"  # a load failed in a way the real service does not recover from
