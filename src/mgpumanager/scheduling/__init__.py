"""One lease for every GPU job (docs/scheduling.md).

- `core`: the pure decider: queues, priorities, aging, swap affinity, run-time estimates;
- `order`: the ordering rules the core applies (FIFO, priority with aging and affinity);
- `lease`: the asyncio side: jobs wait for their grant, run, and always give it back.

`core` and `order` do no I/O and import no aiohttp.
"""
