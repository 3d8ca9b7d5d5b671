"""Do new soups stall running streams? The gap between tokens of a running stream while 10 new
soups arrive, against the same traffic on soups already merged.

    python benchmarks/serve_merge_stall.py [--hidden 1024] [--layers 8] [--tokens 60] [--repeats 3]

A random Llama made here from a config (the embedded tokenizer; hidden/intermediate/layers as
given), four random LoRA policies (r=16, every linear layer), and `rlphf serve --merge-method svd
--set merge.rank=16` in a subprocess on a loopback port. One `svd` merge of three policies is timed
first in this process (goal: at least 200 ms, so that a merge on the decode thread would show).
Then, `repeats` times and alternately: a greedy stream of `tokens` tokens starts, and after its
fifth chunk `new_soups` requests (one token each) arrive at once, either for soups merged before
(the baseline: the same prefills, no merge) or for soups never seen (each merged on the server's
worker thread). The gaps between the stream's chunks are pooled per condition; the goal is a p99
with new soups within 2x the p99 without.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def random_model(out: Path, hidden: int, intermediate: int, layers: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlphf_cli.models.tiny_random import ensure_tiny_random_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_random_model())
    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # A random model left alone picks byte tokens that make no whole character: the server holds
    # those back, the stream then sends no chunk per token and there are no gaps to measure.
    partial = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
    with torch.no_grad():
        model.lm_head.weight[partial] = 0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=60, help="tokens of the running stream")
    parser.add_argument("--new-soups", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from openai import OpenAI
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve_soak import percentile
    from serve_throughput import random_policies

    from rlphf_cli.merging import merge_in_memory
    from rlphf_cli.merging.io import read_adapter

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="rlphf-stall-") as tmp:
        model = random_model(Path(tmp) / "model", args.hidden, args.intermediate, args.layers)
        run = Path(tmp) / "run"
        random_policies(str(model), run)
        members = [run / "policy" / p for p in ("P1A", "P2A", "P3A")]
        inputs = [read_adapter(m) for m in members]
        tensors = [load_file(str(m / "adapter_model.safetensors")) for m in members]
        start = time.perf_counter()
        merge_in_memory(inputs, tensors, [0.5, 0.3, 0.2], "svd", rank=16)
        merge_ms = (time.perf_counter() - start) * 1000
        params = sum(t.numel() for t in load_file(str(model / "model.safetensors")).values())
        print(f"random Llama: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers "
              f"({params / 1e6:.1f}M parameters); one svd merge of 3 policies (r=16, every linear layer): "
              f"{merge_ms:.0f} ms (goal >= 200 ms: {'met' if merge_ms >= 200 else 'NOT met'})")

        soups = 64
        command = [sys.executable, "-m", "rlphf_cli", "serve", "--model", str(model), "--run-dir", str(run),
                   "--port", "0", "--threads", "1", "--merge-method", "svd", "--set", "merge.rank=16",
                   "--max-soups", str(soups)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "COLUMNS": "250", "OMP_NUM_THREADS": "1"})
        try:
            url = next(m.group(1) for line in proc.stdout if (m := re.search(r"(http://127\.0\.0\.1:\d+)", line)))
            deadline = time.monotonic() + 600
            while get_json(f"{url}/health")["adapter_slots"] < soups and time.monotonic() < deadline:
                time.sleep(0.5)  # the server makes its adapter slots while idle
            client = OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)

            def ask(model_name: str, tokens: int = 1) -> None:
                client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hello"}],
                                               temperature=0, max_tokens=tokens, extra_body={"min_tokens": tokens})

            cached = [f"elementary=1,concise={k + 2},friendly=1" for k in range(args.new_soups)]
            for name in cached:
                ask(name)
            gaps: dict[str, list[float]] = {"merged before": [], "new": []}
            with ThreadPoolExecutor(args.new_soups + 1) as pool:
                for repeat in range(args.repeats):
                    for condition in gaps:
                        names = cached if condition == "merged before" else [
                            f"elementary=1,concise=1,friendly={1000 * repeat + k + 2}" for k in range(args.new_soups)]
                        arrivals: list[float] = []
                        fifth = threading.Event()

                        def stream(arrivals: list[float], fifth: threading.Event) -> None:
                            chunks = client.chat.completions.create(
                                model="P2A", messages=[{"role": "user", "content": "Tell me a story."}],
                                temperature=0, max_tokens=args.tokens, stream=True,
                                extra_body={"min_tokens": args.tokens})
                            for chunk in chunks:
                                if chunk.choices and chunk.choices[0].delta.content:
                                    arrivals.append(time.perf_counter())
                                    if len(arrivals) == 5:
                                        fifth.set()

                        running = pool.submit(stream, arrivals, fifth)
                        fifth.wait(300)
                        list(pool.map(ask, names))
                        running.result()
                        if len(arrivals) < args.tokens // 2:
                            sys.exit(f"the stream sent {len(arrivals)} chunks for {args.tokens} tokens: no gaps to measure")
                        gaps[condition] += [b - a for a, b in zip(arrivals[4:], arrivals[5:], strict=False)]
            with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
                metrics = response.read().decode()
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)

    count = float(re.search(r"^rlphf_soup_merge_seconds_count ([0-9.e+-]+)$", metrics, re.M).group(1))
    total = float(re.search(r"^rlphf_soup_merge_seconds_sum ([0-9.e+-]+)$", metrics, re.M).group(1))
    print(f"{args.repeats} x a stream of {args.tokens} tokens while {args.new_soups} requests arrive; gaps between "
          f"its chunks (ms); load average {os.getloadavg()[0]:.1f}")
    print(f"{'the requests name':<20}{'gaps':>6}{'p50':>8}{'p99':>8}{'max':>8}")
    for condition, values in gaps.items():
        print(f"{'soups ' + condition:<20}{len(values):>6}{percentile(values, 50) * 1000:>8.1f}"
              f"{percentile(values, 99) * 1000:>8.1f}{max(values) * 1000:>8.1f}")
    ratio = percentile(gaps["new"], 99) / percentile(gaps["merged before"], 99)
    print(f"the server merged {count:.0f} soups, {total / count * 1000:.0f} ms each on average (merge + copy into "
          f"an adapter slot), off the decode thread")
    print(f"p99 gap with new soups / without = {ratio:.2f}x (goal <= 2x: {'met' if ratio <= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
