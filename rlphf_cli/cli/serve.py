"""`rlphf serve`: Serve every soup over an OpenAI-compatible API, with a playground page."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from rlphf_cli.cli.common import RecipeOption, RunDirOption, SetOption, cli_errors, console, resolve_recipe


def _opt(*names: str, help: str, **kw):
    return typer.Option(*names, help=help, **kw)


@cli_errors
def serve_command(
    model: Annotated[Optional[str], _opt("--model", help="Base model: 'tiny', a folder or a hub name (model.name).",
                                         show_default=False)] = None,
    policy: Annotated[Optional[list[str]], _opt("--policy", help="Serve an adapter folder as NAME=PATH (repeatable); "
                                                "NAME may be a preference (concise, P2A) or any name.",
                                                show_default=False)] = None,
    host: Annotated[str, _opt("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, _opt("--port", help="Port to listen on (0: any free port).", min=0, max=65535)] = 8000,
    merge_method: Annotated[Optional[str], _opt("--merge-method", help="How soups are merged (merge.method): "
                                                "average | exact | svd | ties | dare.", show_default=False)] = None,
    max_soups: Annotated[int, _opt("--max-soups", help="Soups kept merged in memory (least recently used "
                                   "dropped).", min=1)] = 32,
    max_batch: Annotated[int, _opt("--max-batch", help="Sequences decoded together, whatever their soup.",
                                   min=1)] = 16,
    backend: Annotated[str, _opt("--backend", help="transformers (CPU/GPU) or vllm (GPU, pip install "
                                 "'rlphf\\[vllm]').")] = "transformers",
    profiles: Annotated[Optional[Path], _opt("--profiles", help="YAML mapping user ids to soups "
                                             "(users: {alice: {concise: 0.7, friendly: 0.3}}); a request "
                                             "with model 'soup' and user 'alice' gets Alice's.",
                                             show_default=False)] = None,
    threads: Annotated[Optional[int], _opt("--threads", help="torch CPU threads for decoding (default: torch's); 1 "
                                           "is fastest for small models on a busy machine.", min=1,
                                           show_default=False)] = None,
    log_level: Annotated[str, _opt("--log-level", help="uvicorn's log level (info shows every request).")] = "warning",
    recipe: RecipeOption = None,
    run_dir: RunDirOption = None,
    set_: SetOption = None,
) -> None:
    """Serve every soup over an OpenAI-compatible API, with a playground page.

    The request's model names the mix: base, one policy (concise or P2A), a weighted soup
    (concise=0.7,friendly=0.3) or a combination (P1A+P2A+P3A). A new soup is merged from the
    policies in memory in milliseconds and cached; requests for different soups are decoded in one
    batch. The soup's preference prompts are appended to the last user message, as in
    rlphf generate --prefs. Open the URL it prints for the playground.

    Example: [bold]rlphf serve --run-dir runs/tiny[/]
    """
    from rlphf_cli.jobs import serve_spec
    from rlphf_cli.serving import build_server, run_server
    from rlphf_cli.training import quiet_libraries

    quiet_libraries()  # the startup banner and request logs, not the stack's deprecation notices
    spec = serve_spec(resolve_recipe(recipe, set_, run_dir, model__name=model, merge__method=merge_method),
                      policy or [])
    server = build_server(spec, max_soups=max_soups, max_batch=max_batch, backend=backend, profiles=profiles,
                          threads=threads)

    def ready(url: str) -> None:
        console.print(f"[bold]rlphf serve[/]: {url}  ({server.backend.name} backend, model "
                      f"{server.backend.model_name}, merge {server.policies.method})", highlight=False, soft_wrap=True)
        for policy_ in server.policies.policies.values():
            console.print(f"  policy {policy_.label}: {policy_.path}", highlight=False, soft_wrap=True)
        if server.profiles:
            console.print(f"  profiles: {', '.join(sorted(server.profiles))}", highlight=False)
        console.print(f"  playground: {url}/    models: {url}/v1/models", highlight=False, soft_wrap=True)
        body = json.dumps({"model": server.example_model(),
                           "messages": [{"role": "user", "content": "What is a volcano?"}]})
        console.print(f"  try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
                      f"-d {shlex.quote(body)}", highlight=False, soft_wrap=True, markup=False)
        console.file.flush()

    run_server(server, host=host, port=port, on_ready=ready, log_level=log_level)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
