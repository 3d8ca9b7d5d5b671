"""What seeding every response by its prompt costs: rlphf's per-row seeded sampler against
transformers' own sampling (one global random generator per batch), and against the other way to
make a prompt's samples independent of its batch (one `generate` call per prompt), in one process,
on the same prompts and settings.

    python benchmarks/seeded_sampling.py [--model tiny] [--prompts 48] [--samples 2] [--batch-size 32]

Sampling at temperature 1 with top-p 0.9 (so the warpers run), min_new_tokens = max_new_tokens so
every way generates exactly the same number of tokens. Prints tokens/s and the ratio to
transformers' sampling; target: seeded / transformers >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    from rlphf_cli.data import load_prompts
    from rlphf_cli.generation import Generator
    from rlphf_cli.models import resolve_model
    from rlphf_cli.recipe import load_recipe

    model_dir = resolve_model(args.model)
    recipe = load_recipe(None, [], {
        "model.name": model_dir, "generate.temperature": 1.0, "generate.top_p": 0.9,
        "generate.max_new_tokens": args.new_tokens, "generate.min_new_tokens": args.new_tokens,
        "generate.batch_size": args.batch_size,
    })
    gen = Generator.load(recipe)
    texts = [gen.prompt_text(p["instruction"]) for p in load_prompts("builtin:tiny-eval", args.prompts)]
    seeded_decode = gen._decode

    def global_rng_decode(batch_ids, seeds):
        """transformers' sampling, seeded once per batch: what rlphf did before."""
        tok = gen.tokenizer
        padded = tok.pad({"input_ids": batch_ids}, padding=True, return_tensors="pt")
        torch.manual_seed(seeds[0])
        with torch.inference_mode():
            out = gen.model.generate(**padded, pad_token_id=tok.pad_token_id, eos_token_id=gen._eos_ids(),
                                     **gen.sampling.generate_kwargs())
        rows = out[:, padded["input_ids"].shape[1]:].tolist()
        return [(tok.decode(r, skip_special_tokens=True), len(r)) for r in rows], sum(len(r) for r in rows)

    def per_prompt_decode(batch_ids, seeds):
        """One `generate` call per prompt (its samples together), seeded by the prompt."""
        results, total = [], 0
        per = args.samples
        for start in range(0, len(batch_ids), per):
            out, tokens = global_rng_decode(batch_ids[start:start + per], seeds[start:start + per])
            results += out
            total += tokens
        return results, total

    ways = {"transformers (one RNG per batch)": global_rng_decode, "rlphf seeded per row": seeded_decode,
            "one generate per prompt": per_prompt_decode}
    expected = len(texts) * args.samples * args.new_tokens
    times: dict[str, list[float]] = {name: [] for name in ways}
    for decode in ways.values():  # warm-up
        gen._decode = decode
        gen.generate(texts[:4], num_samples=args.samples)
    for _ in range(args.repeats):  # interleaved, so load changes hit every way alike
        for name, decode in ways.items():
            gen._decode = decode
            start = time.perf_counter()
            results, _ = gen.generate(texts, num_samples=args.samples)
            times[name].append(time.perf_counter() - start)
            assert sum(n for group in results for _, n in group) == expected, name

    # The fastest of the repeats, as timeit does: slower ones measure what else the machine was doing.
    rates = {name: expected / min(ts) for name, ts in times.items()}
    base = rates["transformers (one RNG per batch)"]
    print(f"model {model_dir}: {len(texts)} prompts x {args.samples} samples x {args.new_tokens} new tokens, "
          f"batch {args.batch_size} sequences, {args.threads} thread(s), best of {args.repeats}")
    print(f"{'way':<34}{'tokens/s':>10}{'vs transformers':>17}")
    for name, rate in rates.items():
        print(f"{name:<34}{rate:>10.0f}{rate / base:>17.2f}")
    ratio = rates["rlphf seeded per row"] / base
    print(f"seeded / transformers = {ratio:.2f} (target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})")


if __name__ == "__main__":
    main()
