"""`rlphf serve` throughput: requests/s and tokens/s at concurrency 1 vs 16 (64 requests over 4
soups), the cost of a first request for a new soup vs a cached one, and the memory held by 32
cached soups. One server in this process (transformers backend), the official openai client.

    python benchmarks/serve_throughput.py [--run-dir runs/tiny] [--requests 64] [--concurrency 16]

Uses the run's trained policies (P1A, P2A, P2B, P3A) when they exist, else random LoRA adapters
made with peft (r=16, all linear layers). Greedy decoding with min_tokens = max_tokens, so every
request generates the same number of tokens at both concurrencies. Goals: concurrency 16 / 1 >= 3x
requests/s on 2 cores; a new soup's first request < 50 ms slower than a cached soup's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PREFS = ("P1A", "P2A", "P2B", "P3A")
SOUPS = ("P1A+P2A+P3A", "concise=0.7,friendly=0.3", "informative", "elementary=0.5,informative=0.5")


def random_policies(model_dir: str, run: Path) -> None:
    """policy/<id>/ folders of random LoRA adapters, as the generate benchmark makes them."""
    from generate_throughput import random_adapters  # this folder is on sys.path when run as a script

    for pref, adapter in zip(PREFS, random_adapters(model_dir, run / "adapters", len(PREFS)), strict=True):
        (run / "policy").mkdir(parents=True, exist_ok=True)
        adapter.rename(run / "policy" / pref)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--run-dir", default=None, help="serve its policy/P1A, P2A, P2B, P3A when present")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the decode thread")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import transformers
    from openai import OpenAI

    transformers.utils.logging.disable_progress_bar()
    from rlphf_cli.data import load_prompts
    from rlphf_cli.jobs import serve_spec
    from rlphf_cli.models import resolve_model
    from rlphf_cli.recipe import load_recipe
    from rlphf_cli.serving.server import ServerThread, build_server

    model_dir = resolve_model(args.model)
    prompts = [p["instruction"] for p in load_prompts("builtin:tiny-eval", args.requests)]
    with tempfile.TemporaryDirectory(prefix="rlphf-bench-") as tmp:
        run = Path(args.run_dir) if args.run_dir else Path(tmp)
        if all((run / "policy" / p / "adapter_config.json").is_file() for p in PREFS):
            kind = f"trained policies of {run}"
        else:
            run = Path(tmp)
            random_policies(model_dir, run)
            kind = "random LoRA adapters (r=16, all-linear)"
        recipe = load_recipe(None, [], {"model.name": model_dir, "run_dir": str(run)})
        start = time.perf_counter()
        server = build_server(serve_spec(recipe), max_batch=args.concurrency, max_soups=32, threads=args.threads)
        backend = server.backend
        print(f"model {model_dir}; {kind}; server built in {time.perf_counter() - start:.1f} s; "
              f"decode thread: {args.threads} torch thread(s)")

        with ServerThread(server) as url:
            client = OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)

            def ask(model: str, prompt: str, max_tokens: int = args.max_tokens) -> int:
                reply = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], temperature=0,
                    max_tokens=max_tokens, extra_body={"min_tokens": max_tokens})
                assert reply.usage.completion_tokens == max_tokens
                return reply.usage.completion_tokens

            jobs = [(SOUPS[i % len(SOUPS)], prompts[i % len(prompts)]) for i in range(args.requests)]
            for soup in SOUPS:  # warm-up: every soup merged and cached before timing
                ask(soup, prompts[0], 2)

            def run_at(concurrency: int) -> tuple[float, int]:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    tokens = sum(pool.map(lambda job: ask(*job), jobs))
                return time.perf_counter() - t0, tokens

            timings: dict[int, list[float]] = {1: [], args.concurrency: []}
            tokens = 0
            for _ in range(args.repeats):  # interleaved, so load changes hit both alike
                for concurrency in timings:
                    seconds, tokens = run_at(concurrency)
                    timings[concurrency].append(seconds)
            print(f"{args.requests} requests over {len(SOUPS)} soups, {args.max_tokens} tokens each, greedy, "
                  f"best of {args.repeats}; peak batch {backend.peak_batch}")
            print(f"{'concurrency':<13}{'requests/s':>12}{'tokens/s':>10}")
            rates = {}
            for concurrency, seconds in timings.items():
                best = min(seconds)
                rates[concurrency] = args.requests / best
                print(f"{concurrency:<13}{args.requests / best:>12.2f}{tokens / best:>10.0f}")
            ratio = rates[args.concurrency] / rates[1]
            print(f"concurrency {args.concurrency} / 1 = {ratio:.2f}x requests/s "
                  f"(goal >= 3x: {'met' if ratio >= 3 else 'NOT met'})")

            # Memory of 32 cached soups (adapters only: the base model is shared), and what a soup
            # costs while the cache fills (the server makes spare adapters when idle).
            rss_before, made = rss_bytes(), backend.merges
            for k in range(32):
                ask(f"elementary={k + 1},concise=1,friendly=1", prompts[0], 1)
            fresh = list(backend.merge_seconds)[-(backend.merges - made):]
            held = sum(backend.adapter_bytes().values())
            model_bytes = sum(p.numel() * p.element_size() for n, p in backend.model.named_parameters()
                              if "lora_" not in n)
            print(f"{len(backend.soups)} cached soups hold {held / 2**20:.2f} MiB of adapter tensors "
                  f"({held / len(backend.soups) / 2**10:.0f} KiB each; the shared base model: "
                  f"{model_bytes / 2**20:.1f} MiB); process memory grew {(rss_bytes() - rss_before) / 2**20:.1f} MiB")

            # First request of a new soup vs a cached one, with the cache full: the new soup is merged
            # from memory into the least recently used soup's adapter.
            new, cached = [], []
            for k in range(8):
                weights = f"concise={0.31 + k / 100},friendly={0.69 - k / 100}"
                for bucket in (new, cached):  # the same soup twice: merged, then cached
                    t0 = time.perf_counter()
                    ask(weights, prompts[k], 1)
                    bucket.append(time.perf_counter() - t0)
            extra = (statistics.median(new) - statistics.median(cached)) * 1000
            print(f"first request, 1 token (median of 8): new soup {statistics.median(new) * 1000:.1f} ms, cached "
                  f"{statistics.median(cached) * 1000:.1f} ms: +{extra:.1f} ms (goal < 50 ms: "
                  f"{'met' if extra < 50 else 'NOT met'}); merge + load into a used adapter "
                  f"{statistics.median(list(backend.merge_seconds)[-8:]) * 1000:.1f} ms, while the cache filled "
                  f"{statistics.median(fresh) * 1000:.1f} ms (max {max(fresh) * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
