"""`rlphf serve`: every user's soup on demand, over an OpenAI-compatible HTTP API.

    from rlphf_cli.serving.server import build_server, run_server

    server = build_server(rlphf_cli.jobs.serve_spec(recipe, ["mine=path/to/adapter"]), max_batch=16, max_soups=32)
    run_server(server, host="127.0.0.1", port=8000, on_ready=print)

The request's `model` names the mix (`concise=0.7,friendly=0.3`, `P1A+P2A+P3A`, `base`, one
policy). Backends: `transformers` (rlphf_cli.serving.engine: mixed-adapter continuous batching)
and `vllm` (rlphf_cli.serving.vllm_backend: each soup a LoRARequest). The package itself
imports nothing, so that a module importing one of its parts (policies, protocol) imports no server.
"""
