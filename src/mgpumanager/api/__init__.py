"""What clients see: the HTTP surfaces over the broker (docs/clients.md).

- `app`: the aiohttp applications (the main listener's, a front door's) and their middlewares:
  errors in each surface's dialect, the browser guard (Host and Origin), bearer tokens;
- `routes`: the one table of every route;
- one module per client dialect: `ollama` (Ollama's API at the root), `openai` (the
  OpenAI-compatible `/v1`, with `audio_lists`), `upstream` (each consumer's own API under
  `/upstream/<name>/` and on its front door), `facade` (the broker's own routes);
- `jobs`: a request as a GPU job (the JobSpec handed to the broker);
- `dashboard` (the page at `/ui/` and the event stream) and `metrics` (`/metrics`).
"""
