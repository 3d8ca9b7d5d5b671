"""`rlphf serve`: every user's soup on demand, over an OpenAI-compatible HTTP API.

    server = build_server(rlphf_cli.jobs.serve_spec(recipe, ["mine=path/to/adapter"]), max_batch=16, max_soups=32)
    run_server(server, host="127.0.0.1", port=8000, on_ready=print)

The request's `model` names the mix (`concise=0.7,friendly=0.3`, `P1A+P2A+P3A`, `base`, one
policy). Backends: `transformers` (rlphf_cli.serving.engine: mixed-adapter continuous batching)
and `vllm` (rlphf_cli.serving.vllm_backend: each soup a LoRARequest). Importing this package does
not import torch, FastAPI or uvicorn.
"""

from __future__ import annotations


def build_server(*args, **kwargs):
    from rlphf_cli.serving.server import build_server as build

    return build(*args, **kwargs)


def run_server(*args, **kwargs):
    from rlphf_cli.serving.server import run_server as run

    return run(*args, **kwargs)


__all__ = ["build_server", "run_server"]
