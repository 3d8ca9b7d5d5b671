"""`rlphf serve` soak: many clients, many soups, some clients leaving mid-stream, for a bounded time.

    python benchmarks/serve_soak.py [--duration 120] [--max-requests 5000] [--concurrency 32]
                                    [--soups 50] [--new-soups 20] [--disconnect 0.1]

The server is the real command (`rlphf serve`, transformers backend, --threads 1) in a subprocess
on a loopback port, serving four random LoRA policies (r=16, every linear layer) on the embedded
tiny model; the clients are threads of this process using the official openai client, every
request streamed (temperature 0.7, seeded). Warm-up asks each of the first `soups - new_soups`
soups once, then the soak runs `concurrency` clients until `duration` seconds or `max_requests`
requests, whichever comes first, over all `soups` soups (the last `new_soups` never seen before:
each is asked in the soak's first seconds, then at random). A fraction `disconnect` of the
requests close their stream after three chunks. With --max-soups 32 below 50 soups, soups are
merged again after eviction throughout.

Reported: unexpected errors (anything but the deliberate disconnects; the goal is 0), p50 and p99
of latency and time to first token, tokens/s, and the server's resident memory after warm-up and
at the end (goal: at most 10% growth), plus the server's /metrics counters.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def soup_names(count: int) -> list[str]:
    """Distinct soups of three policies (distinct after normalization too)."""
    return [f"elementary={k + 1},concise={2 * k + 7},friendly=5" for k in range(count)]


def start_server(run: Path, max_batch: int, max_queue: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "rlphf_cli", "serve", "--run-dir", str(run), "--port", "0", "--threads", "1",
               "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--max-soups", "32"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "250", "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        found = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        if found and "rlphf serve" in line:
            return proc, found.group(1)
    raise RuntimeError(f"the server did not start: {proc.stderr.read()}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120, help="soak seconds (a hard cap)")
    parser.add_argument("--max-requests", type=int, default=5000, help="soak requests (a hard cap)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--soups", type=int, default=50)
    parser.add_argument("--new-soups", type=int, default=20)
    parser.add_argument("--disconnect", type=float, default=0.1, help="share of requests that leave mid-stream")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--warmup", type=float, default=15, help="seconds of load after the warm-up soups")
    args = parser.parse_args()
    if args.new_soups >= args.soups:
        parser.error("--new-soups must be below --soups")

    import urllib.request

    from openai import OpenAI

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve_throughput import random_policies

    from rlphf_cli.data import load_prompts
    from rlphf_cli.models import resolve_model

    prompts = [p["instruction"] for p in load_prompts("builtin:tiny-eval", 64)]
    soups = soup_names(args.soups)
    warm, new = soups[:-args.new_soups], soups[-args.new_soups:]
    with tempfile.TemporaryDirectory(prefix="rlphf-soak-") as tmp:
        random_policies(resolve_model("tiny"), Path(tmp))
        proc, url = start_server(Path(tmp), args.max_batch, max_queue=4 * args.concurrency)
        try:
            client = OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=300)
            lock = threading.Lock()
            results: list[dict] = []
            errors: list[str] = []

            def one(model: str, seed: int, leave: bool) -> None:
                start = time.perf_counter()
                first, tokens, chunks = None, 0, 0
                try:
                    stream = client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": prompts[seed % len(prompts)]}],
                        stream=True, stream_options={"include_usage": True}, max_tokens=args.max_tokens,
                        temperature=0.7, seed=seed)
                    for chunk in stream:
                        if chunk.usage:
                            tokens = chunk.usage.completion_tokens
                        if chunk.choices and chunk.choices[0].delta.content:
                            first = first or time.perf_counter()
                            chunks += 1
                            if leave and chunks == 3:
                                stream.close()
                                break
                except Exception as exc:  # every error is counted; none is expected
                    with lock:
                        errors.append(f"{model}: {type(exc).__name__}: {exc}")
                    return
                with lock:
                    results.append({"latency": time.perf_counter() - start, "ttft": (first or time.perf_counter()) - start,
                                    "tokens": tokens, "left": leave, "model": model})

            def clients(plan, deadline: float) -> float:
                """Run `plan` (a list of (model, seed, leave)) on `concurrency` threads until done or deadline."""
                queue = list(reversed(plan))
                started = time.perf_counter()

                def worker():
                    while time.perf_counter() < deadline:
                        with lock:
                            if not queue:
                                return
                            job = queue.pop()
                        one(*job)

                threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                return time.perf_counter() - started

            rng = random.Random(0)
            # Warm-up: every warm soup once, then steady load on them (adapter slots made, caches filled).
            clients([(m, i, False) for i, m in enumerate(warm)], time.perf_counter() + 600)
            clients([(rng.choice(warm), 1000 + i, rng.random() < args.disconnect) for i in range(20_000)],
                    time.perf_counter() + args.warmup)
            results.clear()
            errors.clear()
            rss_warm = rss_mib(proc.pid)
            samples = [rss_warm]

            def sample_rss(stop: threading.Event):
                while not stop.wait(5):
                    samples.append(rss_mib(proc.pid))

            stop = threading.Event()
            sampler = threading.Thread(target=sample_rss, args=(stop,), daemon=True)
            sampler.start()
            plan = [(m, 10**6 + i, False) for i, m in enumerate(new)]  # each new soup early
            plan += [(rng.choice(soups), 2 * 10**6 + i, rng.random() < args.disconnect)
                     for i in range(args.max_requests - len(plan))]
            seconds = clients(plan, time.perf_counter() + args.duration)
            stop.set()
            rss_end = rss_mib(proc.pid)
            with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
                metrics = response.read().decode()
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)

    done = [r for r in results if not r["left"]]
    left = [r for r in results if r["left"]]
    tokens = sum(r["tokens"] for r in done)
    seen_new = len({r["model"] for r in results} & set(new))
    print(f"soak: {len(results) + len(errors)} requests in {seconds:.0f} s at concurrency {args.concurrency}, "
          f"{args.soups} soups ({args.new_soups} new: {seen_new} served), {len(left)} clients left mid-stream, "
          f"--max-batch {args.max_batch}, --max-soups 32; load average {os.getloadavg()[0]:.1f}")
    print(f"unexpected errors: {len(errors)} (goal 0)" + "".join(f"\n  {e}" for e in errors[:5]))
    print(f"latency p50 {percentile([r['latency'] for r in done], 50):.2f} s, p99 "
          f"{percentile([r['latency'] for r in done], 99):.2f} s; time to first token p50 "
          f"{percentile([r['ttft'] for r in results], 50):.2f} s, p99 {percentile([r['ttft'] for r in results], 99):.2f} s")
    print(f"throughput: {tokens / seconds:.0f} tokens/s ({len(done) / seconds:.2f} completed requests/s)")
    growth = (rss_end - rss_warm) / rss_warm * 100
    print(f"server memory: {rss_warm:.0f} MiB after warm-up, {rss_end:.0f} MiB at the end (max {max(samples):.0f}): "
          f"{growth:+.1f}% (goal <= +10%)")
    print(f"server /metrics: soup cache hits {metric(metrics, 'rlphf_soup_cache_hits_total'):.0f}, misses "
          f"{metric(metrics, 'rlphf_soup_cache_misses_total'):.0f}, merges "
          f"{metric(metrics, 'rlphf_soup_merge_seconds_count'):.0f} (mean "
          f"{metric(metrics, 'rlphf_soup_merge_seconds_sum') / max(1, metric(metrics, 'rlphf_soup_merge_seconds_count')) * 1000:.1f} ms), "
          f"cancelled choices {metric(metrics, 'rlphf_cancelled_choices_total'):.0f}")
    ok = not errors and growth <= 10 and seen_new == len(new)
    print("soak: " + ("PASS" if ok else "FAIL"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
