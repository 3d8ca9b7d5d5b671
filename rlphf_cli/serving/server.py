"""Building a server from a recipe and running it with uvicorn."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rlphf_cli.errors import InputError
from rlphf_cli.registry import Registry
from rlphf_cli.serving.policies import PolicySet, load_profiles
from rlphf_cli.specs import ServeSpec

# name -> factory(spec, policies, max_batch=, max_soups=) -> Backend; imported lazily (torch, vllm)
BACKENDS: Registry[Callable] = Registry("serving backend")


@BACKENDS.register("transformers")
def _transformers(spec: ServeSpec, policies, **options):
    from rlphf_cli.serving.engine import TransformersBackend

    return TransformersBackend(spec.model, policies, **options)


@BACKENDS.register("vllm")
def _vllm(spec: ServeSpec, policies, **options):
    from rlphf_cli.serving.vllm_backend import VLLMBackend

    return VLLMBackend(spec.model, policies, sampling=spec.sampling, cache_bytes=spec.limits.soup_cache_bytes,
                       **options)


@dataclass
class Server:
    app: object  # the FastAPI app
    backend: object
    policies: PolicySet
    profiles: dict

    def example_model(self) -> str:
        prefs = [p for p in self.policies.policies.values() if p.preference]
        if len(prefs) >= 2:
            return f"{prefs[0].preference.alias}=0.7,{prefs[1].preference.alias}=0.3"
        return next(iter(self.policies.policies))


def build_server(spec: ServeSpec, *, max_soups: int = 32, max_batch: int = 16, backend: str = "transformers",
                 profiles: str | Path | None = None, threads: int | None = None, api_keys: Sequence[str] = (),
                 log_requests: bool = False, log_prompts: bool = False) -> Server:
    """Load the model and the policies of `spec` (rlphf_cli.jobs.serve_spec) and build the app.
    Every input is checked here, before anything listens. `api_keys`: the keys a /v1 request must
    bring (none: open); `log_requests`: one access-log line per /v1 request ('rlphf.serve.access'),
    with the last user message only when `log_prompts`."""
    if max_batch < 1 or max_soups < 1:
        raise InputError(f"--max-batch and --max-soups must be >= 1 (got {max_batch}, {max_soups})")
    if threads and backend != "transformers":
        raise InputError("--threads is for --backend transformers (CPU decoding)")
    if log_prompts and not log_requests:
        raise InputError("--log-prompts adds the prompt to --log-requests' lines: give both")
    factory = BACKENDS.get(backend)
    if backend == "vllm":
        from rlphf_cli.serving.vllm_backend import import_vllm

        import_vllm()  # before any loading: a missing vLLM is one clear line
    served = PolicySet.from_spec(spec)
    user_soups = load_profiles(profiles, served) if profiles else {}
    options = {"threads": threads} if threads else {}
    loaded = factory(spec, served, max_batch=max_batch, max_soups=max_soups, **options)

    from rlphf_cli.serving.api import Service, create_app
    from rlphf_cli.serving.auth import KeyChecker

    service = Service(loaded, served, prompt_format=spec.model.prompt_format, sampling=spec.sampling,
                      limits=spec.limits, max_batch=max_batch, profiles=user_soups)
    max_tokens = min(spec.sampling.max_new_tokens, spec.limits.max_tokens_limit)
    config = {"dimensions": served.dimensions(), "others": served.others(), "models": served.model_ids(),
              "max_tokens": max_tokens, "backend": backend, "model": spec.model.name, "users": sorted(user_soups)}
    from rlphf_cli.serving.learn import ProfileLearning

    prompts = [p["instruction"] for p in spec.eval_prompts.load()] if spec.eval_prompts else []
    learning = ProfileLearning(service, spec.run_dir, prompts, Path(profiles).expanduser() if profiles else None,
                               settings=spec.learn)
    app = create_app(service, config, keys=KeyChecker(api_keys), log_requests=log_requests, log_prompts=log_prompts,
                     learning=learning)
    return Server(app, loaded, served, user_soups)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so a busy port is a clear error (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def run_server(server: Server, host: str = "127.0.0.1", port: int = 8000,
               on_ready: Callable[[str], None] | None = None, log_level: str = "warning") -> None:
    """Serve until interrupted. `on_ready(url)` is called once the socket listens."""
    import uvicorn

    sock = bind(host, port)
    config = uvicorn.Config(server.app, log_level=log_level, access_log=log_level in ("info", "debug"),
                            timeout_graceful_shutdown=5)
    if on_ready:
        on_ready(url_of(sock))
    uvicorn.Server(config).run(sockets=[sock])


class ServerThread:
    """A server running in a background thread of this process (tests, benchmarks, notebooks).

        with ServerThread(server) as url:
            OpenAI(base_url=f"{url}/v1", api_key="-").models.list()
    """

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0):
        import threading

        import uvicorn

        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self._uvicorn = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        import time

        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=10)
        self.sock.close()
