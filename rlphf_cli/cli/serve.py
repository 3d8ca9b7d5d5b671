"""`rlphf serve`: Serve every soup over an OpenAI-compatible API, with a playground page."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from rlphf_cli.cli.common import RecipeOption, RunDirOption, SetOption, cli_errors, console, resolve_recipe
from rlphf_cli.specs import ServeLimits


def _opt(*names: str, help: str, **kw):
    return typer.Option(*names, help=help, **kw)


_LIMITS = ServeLimits()


@cli_errors
def serve_command(
    model: Annotated[Optional[str], _opt("--model", help="Base model: 'tiny', a folder or a hub name (model.name).",
                                         show_default=False)] = None,
    policy: Annotated[Optional[list[str]], _opt("--policy", help="Serve an adapter folder as NAME=PATH (repeatable); "
                                                "NAME may be a preference (concise, P2A) or any name.",
                                                show_default=False)] = None,
    host: Annotated[str, _opt("--host", help="Address to listen on; beyond loopback it needs --api-key or "
                              "--no-auth.")] = "127.0.0.1",
    port: Annotated[int, _opt("--port", help="Port to listen on (0: any free port).", min=0, max=65535)] = 8000,
    api_key: Annotated[Optional[list[str]], _opt("--api-key", help="Require this key on /v1 routes, sent as "
                                                 "'Authorization: Bearer KEY' (repeatable; also $RLPHF_API_KEY, "
                                                 "comma-separated).", show_default=False)] = None,
    no_auth: Annotated[bool, _opt("--no-auth", help="Serve without a key on a non-loopback --host, on purpose.")] = False,
    merge_method: Annotated[Optional[str], _opt("--merge-method", help="How soups are merged (merge.method): "
                                                "average | exact | svd | ties | dare.", show_default=False)] = None,
    max_soups: Annotated[int, _opt("--max-soups", help="Soups kept merged in memory (least recently used "
                                   "dropped); their adapters are made ahead while idle.", min=1)] = 32,
    max_batch: Annotated[int, _opt("--max-batch", help="Sequences decoded together, whatever their soup.",
                                   min=1)] = 16,
    max_queue: Annotated[int, _opt("--max-queue", help="Requests waiting for a batch slot; beyond, 429 with "
                                   "Retry-After.", min=1)] = _LIMITS.max_queue,
    max_requests_per_key: Annotated[int, _opt("--max-requests-per-key", help="Requests in flight per API key "
                                              "(0: no limit).", min=0)] = _LIMITS.max_requests_per_key,
    max_body_bytes: Annotated[int, _opt("--max-body-bytes", help="Largest request body.",
                                        min=1)] = _LIMITS.max_body_bytes,
    max_prompt_tokens: Annotated[Optional[int], _opt("--max-prompt-tokens", help="Longest prompt (default: the "
                                                     "model's context minus the answer's max_tokens).", min=1,
                                                     show_default=False)] = None,
    max_tokens_limit: Annotated[int, _opt("--max-tokens-limit", help="Most tokens one answer may ask for "
                                          "(max_tokens).", min=1)] = _LIMITS.max_tokens_limit,
    max_n: Annotated[int, _opt("--max-n", help="Most choices per request (n).", min=1)] = _LIMITS.max_n,
    max_stop: Annotated[int, _opt("--max-stop", help="Most stop sequences per request.", min=1)] = _LIMITS.max_stop,
    max_stop_chars: Annotated[int, _opt("--max-stop-chars", help="Longest stop sequence.",
                                        min=1)] = _LIMITS.max_stop_chars,
    max_soup_members: Annotated[int, _opt("--max-soup-members", help="Most policies in one soup.",
                                          min=1)] = _LIMITS.max_soup_members,
    soup_cache_bytes: Annotated[int, _opt("--soup-cache-bytes", help="--backend vllm: disk budget of merged soup "
                                          "folders (least recently used deleted).", min=1)] = _LIMITS.soup_cache_bytes,
    backend: Annotated[str, _opt("--backend", help="transformers (CPU/GPU) or vllm (GPU, pip install "
                                 "'rlphf\\[vllm]').")] = "transformers",
    profiles: Annotated[Optional[Path], _opt("--profiles", help="YAML mapping user ids to soups "
                                             "(users: {alice: {concise: 0.7, friendly: 0.3}}); a request "
                                             "with model 'soup' and user 'alice' gets Alice's.",
                                             show_default=False)] = None,
    threads: Annotated[Optional[int], _opt("--threads", help="torch CPU threads for decoding (default: torch's); 1 "
                                           "is fastest for small models on a busy machine.", min=1,
                                           show_default=False)] = None,
    log_requests: Annotated[bool, _opt("--log-requests", help="One access-log line per /v1 request on stderr "
                                       "(key number, soup, tokens, times; no prompt text).")] = False,
    log_prompts: Annotated[bool, _opt("--log-prompts", help="With --log-requests: add the last user "
                                      "message.")] = False,
    log_level: Annotated[str, _opt("--log-level", help="uvicorn's log level (info shows every request).")] = "warning",
    recipe: RecipeOption = None,
    run_dir: RunDirOption = None,
    set_: SetOption = None,
) -> None:
    """Serve every soup over an OpenAI-compatible API, with a playground page.

    The request's model names the mix: base, one policy (concise or P2A), a weighted soup
    (concise=0.7,friendly=0.3) or a combination (P1A+P2A+P3A). A new soup is merged from the
    policies in memory (off the decoding thread) and cached; requests for different soups are
    decoded in one batch. The soup's preference prompts are appended to the last user message, as
    in rlphf generate --prefs, and answers are sampled with the recipe's generate settings. Open the
    URL it prints for the playground; GET /metrics has Prometheus figures.

    Example: [bold]rlphf serve --run-dir runs/tiny --api-key $KEY[/]
    """
    from rlphf_cli.jobs import serve_spec
    from rlphf_cli.runs import register_secret_values
    from rlphf_cli.serving.auth import api_keys, check_exposure
    from rlphf_cli.serving.server import build_server, run_server
    from rlphf_cli.training import quiet_libraries

    keys = api_keys(api_key or ())
    register_secret_values(keys)  # never written anywhere, should anything write the command's options
    check_exposure(host, keys, no_auth)
    quiet_libraries()  # the startup banner and request logs, not the stack's deprecation notices
    limits = ServeLimits(max_body_bytes, max_prompt_tokens, max_tokens_limit, max_n, max_stop, max_stop_chars,
                         max_soup_members, max_queue, max_requests_per_key, soup_cache_bytes)
    spec = serve_spec(resolve_recipe(recipe, set_, run_dir, model__name=model, merge__method=merge_method),
                      policy or [], limits)
    server = build_server(spec, max_soups=max_soups, max_batch=max_batch, backend=backend, profiles=profiles,
                          threads=threads, api_keys=keys, log_requests=log_requests, log_prompts=log_prompts)
    if log_requests:
        access = logging.getLogger("rlphf.serve.access")
        access.setLevel(logging.INFO)
        access.addHandler(logging.StreamHandler())
    run_server(server, host=host, port=port, on_ready=lambda url: _print_ready(server, url, len(keys)),
               log_level=log_level)


def _print_ready(server, url: str, keys: int) -> None:
    console.print(f"[bold]rlphf serve[/]: {url}  ({server.backend.name} backend, model "
                  f"{server.backend.model_name}, merge {server.policies.method})", highlight=False, soft_wrap=True)
    for policy in server.policies.policies.values():
        console.print(f"  policy {policy.label}: {policy.path}", highlight=False, soft_wrap=True)
    if server.profiles:
        console.print(f"  profiles: {', '.join(sorted(server.profiles))}", highlight=False)
    console.print(f"  playground: {url}/    models: {url}/v1/models    metrics: {url}/metrics", highlight=False,
                  soft_wrap=True)
    console.print(f"  auth: {f'{keys} API key(s) required' if keys else 'none'}", highlight=False)
    body = json.dumps({"model": server.example_model(), "messages": [{"role": "user", "content": "What is a volcano?"}]})
    auth = " -H \"Authorization: Bearer $RLPHF_API_KEY\"" if keys else ""
    console.print(f"  try: curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
                  f"-d {shlex.quote(body)}", highlight=False, soft_wrap=True, markup=False)
    console.file.flush()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
