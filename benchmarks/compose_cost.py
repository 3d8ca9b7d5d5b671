"""What decoding-time mixing costs: tokens/s and peak memory of `--compose logits` (k experts, each
row decoded once per expert, log-probabilities mixed) against a parameter soup (the k experts merged
into the weights: the base model's cost) and the base model, for 2 and 3 experts, on two models:

- `tiny`: the built-in tiny model;
- `7b-shaped`: a random Llama with Llama-2-7B layer shapes (hidden 4096, intermediate 11008, 32
  heads, vocabulary 32000) cut to --layers layers (default 1), float32 on CPU, bfloat16 on a GPU.

    python benchmarks/compose_cost.py [--models tiny,7b-shaped] [--prompts 8] [--new-tokens 16]

Random LoRA adapters (r=16, all linear layers). Greedy decoding with min_new_tokens = max_new_tokens,
so every system generates the same number of tokens. Every system is loaded in this one process
(one model copy each: about 1.9 GB per system for the 1-layer 7B shape in float32) and their repeats
are interleaved; the fastest of --repeats counts. Peak memory is the extra memory while decoding, above
what the loaded model holds: torch.cuda.max_memory_allocated on a GPU, else the process's resident
set sampled every millisecond. Prints each system's figures and its ratios to the soup.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate_throughput import random_adapters, tokens_per_second  # noqa: E402


def seven_b_shaped(out: Path, layers: int) -> Path:
    """A random Llama of Llama-2-7B layer shapes with `layers` layers, and the tiny model's tokenizer
    (ids beyond it are simply never produced by the prompts)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlphf_cli.models import resolve_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("tiny"))
    tokenizer.save_pretrained(out)
    del model
    gc.collect()
    return out


class PeakMemory:
    """The peak extra memory (bytes) of the block: CUDA allocations, else resident set polled."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak, self._stop = cuda, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self, start: int) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - start)
            time.sleep(0.001)

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            gc.collect()
            self._thread = threading.Thread(target=self._poll, args=(self._rss(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
        else:
            self._stop.set()
            self._thread.join()


def peak_mib(gen, texts, cuda: bool) -> float:
    with PeakMemory(cuda) as peak:
        gen.generate(texts)
    return peak.peak / 2**20


def run_model(name: str, model_dir: str, args, work: Path, cuda: bool) -> None:
    from rlphf_cli import jobs
    from rlphf_cli.data import load_prompts
    from rlphf_cli.generation import Generator
    from rlphf_cli.recipe import load_recipe

    settings = {"model.name": model_dir, "generate.temperature": 0, "generate.max_new_tokens": args.new_tokens,
                "generate.min_new_tokens": args.new_tokens, "generate.batch_size": args.batch_size}
    if name != "tiny":
        settings["model.dtype"] = "bfloat16" if cuda else "float32"
    recipes = {compose: load_recipe(None, [], {**settings, "generate.compose": compose})
               for compose in ("params", "logits")}
    adapters = random_adapters(model_dir, work / f"{name}-adapters")
    prompts = load_prompts("builtin:tiny-eval", args.prompts)

    def loader(compose: str, soup=None):
        recipe = recipes[compose]
        return lambda: Generator.load(jobs.model_spec(recipe), jobs.weights(recipe, None, soup),
                                      sampling=jobs.sampling(recipe), batch_size=recipe.generate.batch_size)

    # Every system loaded at once and their repeats interleaved, so a change of load on a shared
    # machine hits them alike (generate_throughput.tokens_per_second: the fastest repeat counts).
    systems = {"base": loader("params")()}
    for k in (2, 3):
        soup = [(str(a), 1 / k) for a in adapters[:k]]
        systems[f"soup, {k} experts (params)"] = loader("params", soup)()
        systems[f"mix, {k} experts (logits)"] = loader("logits", soup)()
    texts = [systems["base"].prompt_text(p["instruction"]) for p in prompts]
    for gen in systems.values():  # warm-up
        gen.generate(texts[:2])
    runs = {label: lambda gen=gen: gen.generate(texts)[0] for label, gen in systems.items()}
    rates = tokens_per_second(runs, args.repeats, len(texts) * args.new_tokens)
    rows = {label: (rates[label], peak_mib(gen, texts, cuda)) for label, gen in systems.items()}
    del systems
    gc.collect()
    print(f"\n{name} ({model_dir}): {len(texts)} prompts x {args.new_tokens} new tokens, batch {args.batch_size}, "
          f"{'cuda' if cuda else f'{args.threads} CPU thread(s)'}, best of {args.repeats}")
    print(f"{'':<28}{'tokens/s':>10}{'peak MiB':>10}{'speed/soup':>12}{'speed/base':>12}{'memory/soup':>13}")
    base_rate = rows["base"][0]
    for label, (rate, mib) in rows.items():
        k = label.split(", ")[1][0] if ", " in label else None
        soup_rate, soup_mib = rows[f"soup, {k} experts (params)"] if k else rows["base"]
        # Below 1 MiB the resident set's page granularity is all a ratio would show.
        memory = f"{mib / soup_mib:.2f}" if soup_mib >= 1 else "n/a"
        print(f"{label:<28}{rate:>10.1f}{mib:>10.1f}{rate / soup_rate:>12.2f}{rate / base_rate:>12.2f}{memory:>13}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,7b-shaped")
    parser.add_argument("--layers", type=int, default=1, help="layers of the 7B-shaped model (each system holds one copy)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=24, help="rows decoded together (a k-mix: k per answer)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    import transformers

    from rlphf_cli.models import resolve_model

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="rlphf-compose-") as tmp:
        work = Path(tmp)
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            model_dir = str(seven_b_shaped(work / "7b-shaped", args.layers)) if name == "7b-shaped" else resolve_model(name)
            run_model(name, model_dir, args, work, cuda)


if __name__ == "__main__":
    main()
