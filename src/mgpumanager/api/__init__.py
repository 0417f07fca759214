"""What clients see: the HTTP surfaces over the broker (docs/clients.md).

- `app`: the aiohttp application, its middlewares and the broker's own routes (the facade,
  status, events, admin);
- `compat`: the routes of every client dialect (Ollama at the root, OpenAI `/v1`, each
  service's own API under `/upstream/<consumer>/`, front doors);
- `dashboard`: the page at `/ui/`;
- `metrics`: `/metrics` for Prometheus.
"""
