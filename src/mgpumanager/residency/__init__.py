"""What is in VRAM, and making room for the next job (docs/residency.md).

- `records`: each consumer's state and the one table of legal transitions;
- `planner`: the pure decision of whom to evict, least recently used first;
- `view`: the reading side, records kept matching what the upstreams and the card report;
- `evict`: the changing side, unload, confirm the memory came back, then load;
- `idle`: unloading what sat idle, and bringing back what is kept warm.

`records` and `planner` do no I/O and import no aiohttp. The package's log lines go to the
logger `mgpumanager.residency`.
"""
