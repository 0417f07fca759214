"""What the broker knows of the services behind it and of the card.

- `adapters/`: one protocol adapter per upstream type (Ollama, ComfyUI, speaches, vLLM, a
  command, a generic HTTP service): health, residency, unload, load, relaying a job;
- `gpu`: the GPU readers (NVML, static, the simulated card);
- `health`: the background health checks;
- `catalog`: which models each consumer serves, merged into the lists clients ask for.
"""
