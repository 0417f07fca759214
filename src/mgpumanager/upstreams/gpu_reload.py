"""What a SIGHUP reload can do with a changed `gpu` section, and what needs a restart.

Applied at once: `safety_margin_mib`, `poll_interval_s`, `confirm_poll_s`,
`reconcile_interval_s` and `static_settle_s` (read from the registry each time they are used),
and `total_mib` of a
`static` card (its reader has nothing else to go on). A new reader is a restart: `backend`,
`index`, `sim_url`, `devices` (the cards of a static box), and `total_mib` where it caps a
card that is read (nvml, sim) — the broker's residency was measured through the old reader.
Each such key is named with its old and new value, and the whole new registry is then
refused: the old one stays in force.
"""

from __future__ import annotations

from mgpumanager.registry import Config, GpuConfig
from mgpumanager.upstreams.gpu import GpuReader, StaticReader

LIVE = (
    "safety_margin_mib",
    "poll_interval_s",
    "confirm_poll_s",
    "reconcile_interval_s",
    "static_settle_s",
)
RESTART_HINT = "restart the service to apply it (systemctl restart mgpumanager)"


def _changed(old: GpuConfig, new: GpuConfig, key: str) -> str:
    return f"gpu.{key} {getattr(old, key)} -> {getattr(new, key)}"


def needs_restart(old: Config, new: Config, reader: GpuReader) -> list[str]:
    """The changes of `new` that a reload cannot apply, each as `KEY OLD -> NEW`."""
    out = []
    if new.listen != old.listen:
        out.append(f"listen {old.listen} -> {new.listen}")
    for key in ("backend", "index", "sim_url", "devices"):
        if getattr(new.gpu, key) != getattr(old.gpu, key):
            out.append(_changed(old.gpu, new.gpu, key))
    if new.gpu.total_mib != old.gpu.total_mib and not isinstance(reader, StaticReader):
        out.append(
            _changed(old.gpu, new.gpu, "total_mib") + f" (a cap of the {reader.backend} card)"
        )
    return out


def refusal(changes: list[str]) -> str:
    return f"{'; '.join(changes)}: {RESTART_HINT}; the registry in force stays"


def apply_gpu(old: Config, new: Config, reader: GpuReader) -> list[str]:
    """Apply what can be (after `needs_restart` found nothing); answers what changed."""
    applied = [
        _changed(old.gpu, new.gpu, k) for k in LIVE if getattr(new.gpu, k) != getattr(old.gpu, k)
    ]
    total = new.gpu.total_mib
    one_card = not new.gpu.devices  # a static box of several cards takes no total_mib
    if (
        total != old.gpu.total_mib
        and isinstance(reader, StaticReader)
        and one_card
        and total is not None
    ):
        reader.resize(total)
        applied.append(_changed(old.gpu, new.gpu, "total_mib"))
    return applied


__all__ = ["LIVE", "apply_gpu", "needs_restart", "refusal"]
