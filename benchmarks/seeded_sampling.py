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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from generate_throughput import (  # noqa: E402 (after the environment)
    decoding_arguments,
    decoding_recipe,
    print_rates,
    tokens_per_second,
)

TRANSFORMERS = "transformers (one RNG per batch)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    decoding_arguments(parser, batch_size=32, repeats=3)
    parser.add_argument("--samples", type=int, default=2)
    args = parser.parse_args()

    import torch

    from rlphf_cli import jobs
    from rlphf_cli.data import load_prompts
    from rlphf_cli.generation import Generator

    recipe = decoding_recipe(args, **{"generate.temperature": 1.0, "generate.top_p": 0.9})
    model_dir = recipe.model.name
    gen = Generator.load(jobs.model_spec(recipe), sampling=jobs.sampling(recipe), batch_size=recipe.generate.batch_size)
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

    ways = {TRANSFORMERS: global_rng_decode, "rlphf seeded per row": seeded_decode,
            "one generate per prompt": per_prompt_decode}
    for decode in ways.values():  # warm-up
        gen._decode = decode
        gen.generate(texts[:4], num_samples=args.samples)

    def run(decode):
        gen._decode = decode
        return gen.generate(texts, num_samples=args.samples)[0]

    runs = {name: lambda decode=decode: run(decode) for name, decode in ways.items()}
    rates = tokens_per_second(runs, args.repeats, len(texts) * args.samples * args.new_tokens)
    print(f"model {model_dir}: {len(texts)} prompts x {args.samples} samples x {args.new_tokens} new tokens, "
          f"batch {args.batch_size} sequences, {args.threads} thread(s), best of {args.repeats}")
    print_rates(rates, TRANSFORMERS)
    base = rates[TRANSFORMERS]
    ratio = rates["rlphf seeded per row"] / base
    print(f"seeded / transformers = {ratio:.2f} (target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})")


if __name__ == "__main__":
    main()
