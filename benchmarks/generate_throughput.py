"""Decoding speed of the base model, one unmerged LoRA (peft's default) and a 3-way soup as
`rlphf generate` runs it (merged into the weights), in one process, on the same prompts.

    python benchmarks/generate_throughput.py [--model tiny] [--run-dir runs/tiny] [--prompts 48]

Uses the run's trained policies P1A, P2A, P3A when they exist, else random LoRA adapters made
with peft (r=16, all linear layers). Greedy decoding with min_new_tokens = max_new_tokens, so every
system generates exactly the same number of tokens. Target: soup / base >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def random_adapters(model_dir: str, out: Path, count: int = 3) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    for i in range(count):
        torch.manual_seed(100 + i)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                            task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        with torch.no_grad():  # small updates, like a trained policy's
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.01)
        peft_model.save_pretrained(out / f"lora{i}")
        dirs.append(out / f"lora{i}")
    return dirs


def decoding_arguments(parser: argparse.ArgumentParser, *, batch_size: int, repeats: int) -> None:
    """The options every decoding benchmark takes."""
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")


def decoding_recipe(args, **settings):
    """Threads set, transformers quiet; a recipe for args.model where every response is exactly
    --new-tokens long (min = max), with `settings` (dotted recipe keys) on top."""
    import torch
    import transformers

    from rlphf_cli.models import resolve_model
    from rlphf_cli.recipe import load_recipe

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    return load_recipe(None, [], {"model.name": resolve_model(args.model), "generate.max_new_tokens": args.new_tokens,
                                  "generate.min_new_tokens": args.new_tokens, "generate.batch_size": args.batch_size,
                                  **settings})


def tokens_per_second(runs: dict, repeats: int, expected_tokens: int) -> dict[str, float]:
    """Each run (name -> callable returning [[(text, tokens), ...] per prompt]) `repeats` times,
    interleaved so that load changes hit every run alike; the fastest repeat counts, as in timeit
    (slower ones measure what else the machine was doing)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results = run()
            times[name].append(time.perf_counter() - start)
            assert sum(n for group in results for _, n in group) == expected_tokens, name
    return {name: expected_tokens / min(ts) for name, ts in times.items()}


def print_rates(rates: dict[str, float], base: str) -> None:
    width = max(len(name) for name in rates) + 2
    print(f"{'':<{width}}{'tokens/s':>10}{'ratio':>8}  (to {base})")
    for name, rate in rates.items():
        print(f"{name:<{width}}{rate:>10.0f}{rate / rates[base]:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    decoding_arguments(parser, batch_size=16, repeats=5)
    parser.add_argument("--run-dir", default=None, help="use its policy/P1A, P2A, P3A when present")
    args = parser.parse_args()

    from rlphf_cli import jobs
    from rlphf_cli.data import load_prompts
    from rlphf_cli.generation import Generator

    recipe = decoding_recipe(args, **{"generate.temperature": 0, **({"run_dir": args.run_dir} if args.run_dir else {})})
    model_dir = recipe.model.name
    prompts = load_prompts("builtin:tiny-eval", args.prompts)

    with tempfile.TemporaryDirectory(prefix="rlphf-bench-") as tmp:
        policies = [Path(args.run_dir, "policy", p) for p in ("P1A", "P2A", "P3A")] if args.run_dir else []
        if policies and all((p / "adapter_config.json").is_file() for p in policies):
            adapters, kind = policies, "trained policies"
        else:
            adapters, kind = random_adapters(model_dir, Path(tmp)), "random LoRA adapters (r=16, all-linear)"
        start = time.perf_counter()
        def load(adapter=None, soup=None, merge=True) -> Generator:
            return Generator.load(jobs.model_spec(recipe), jobs.weights(recipe, adapter, soup),
                                  sampling=jobs.sampling(recipe), batch_size=recipe.generate.batch_size, merge=merge)

        systems = {"base": load()}
        systems["lora (unmerged)"] = load(adapter=adapters[0], merge=False)
        load_start = time.perf_counter()
        systems["soup (3-way, merged)"] = load(soup=[(str(a), 1 / 3) for a in adapters])
        soup_load = time.perf_counter() - load_start
        print(f"model {model_dir}\nadapters: {kind}; loading took {time.perf_counter() - start:.1f} s "
              f"(soup: merge + merge_and_unload {soup_load:.2f} s)")

        texts = [systems["base"].prompt_text(p["instruction"]) for p in prompts]
        for gen in systems.values():  # warm-up
            gen.generate(texts[: args.batch_size])
        runs = {name: lambda gen=gen: gen.generate(texts)[0] for name, gen in systems.items()}
        rates = tokens_per_second(runs, args.repeats, len(texts) * args.new_tokens)

    print(f"{len(texts)} prompts x {args.new_tokens} new tokens, batch {args.batch_size}, "
          f"{args.threads} thread(s), best of {args.repeats}")
    print_rates(rates, "base")
    base = rates["base"]
    soup_ratio = rates["soup (3-way, merged)"] / base
    print(f"soup / base = {soup_ratio:.2f} (target >= 0.9: {'met' if soup_ratio >= 0.9 else 'NOT met'}); "
          f"unmerged LoRA / base = {rates['lora (unmerged)'] / base:.2f}")


if __name__ == "__main__":
    main()
