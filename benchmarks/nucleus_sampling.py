"""One sampling step over a 262k-token vocabulary: transformers' warpers (temperature, top-p by a sort
of the whole vocabulary) then rlphf's seeded draw, against rlphf's `sample` (the nucleus from a
partial top-k), on next-token logits of a real model, in one process. Also times the model's own
decode step at the same batch, for scale: the old sampler cost more than the forward on Gemma 3 270M.

    python benchmarks/nucleus_sampling.py [--model gemma-3-270m-sft] [--batch 16] [--top-p 0.95] [--repeats 20]

Prints ms per step for each, the ratio, and how many of the drawn tokens differ (0 expected: the
nucleus is the same set but where float rounding decides a tie at its edge).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m-sft")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    from rlphf_cli.data import load_prompts
    from rlphf_cli.models import resolve_model
    from rlphf_cli.prompting import render_prompt, text_ids
    from rlphf_cli.sampling import draw, sample

    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [p["instruction"] for p in load_prompts("builtin:tiny-eval", args.batch)]
    ids = [text_ids(tokenizer, render_prompt(tokenizer, p, "tulu"), "tulu") for p in prompts]
    batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    with torch.inference_mode():
        torch.manual_seed(0)  # a few sampled tokens in: the answer's first token is nearly always the same
        sequences = model.generate(**batch, max_new_tokens=6, do_sample=True, top_p=args.top_p,
                                   pad_token_id=tokenizer.pad_token_id)
        mask = (sequences != tokenizer.pad_token_id).long()
        out = model(input_ids=sequences, attention_mask=mask, use_cache=True)
        logits = out.logits[:, -1, :].float()
        step_ids = logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        start = time.perf_counter()
        for _ in range(3):
            model(input_ids=step_ids, attention_mask=mask, cache=out.past_key_values, use_cache=True)
        forward_ms = (time.perf_counter() - start) / 3 * 1000

    def transformers_warpers(u):
        scores = logits
        if args.temperature != 1.0:
            scores = TemperatureLogitsWarper(args.temperature)(None, scores)
        return draw(TopPLogitsWarper(args.top_p)(None, scores), u)

    def rlphf_sample(u):
        return sample(logits, u, args.temperature, 0, args.top_p)

    generator = torch.Generator().manual_seed(0)
    uniforms = [torch.rand(args.batch, dtype=torch.float64, generator=generator) for _ in range(args.repeats)]
    times = {"transformers warpers + draw": 0.0, "rlphf sample": 0.0}
    differ = 0
    for u in uniforms:  # interleaved, so load changes hit both alike
        results = []
        for name, fn in (("transformers warpers + draw", transformers_warpers), ("rlphf sample", rlphf_sample)):
            start = time.perf_counter()
            results.append(fn(u))
            times[name] += time.perf_counter() - start
        differ += int((results[0] != results[1]).sum())
    nucleus = torch.isfinite(TopPLogitsWarper(args.top_p)(None, logits / args.temperature)).sum(-1)
    print(f"{args.model}: batch {args.batch}, vocabulary {logits.shape[-1]:,}, top_p {args.top_p}, "
          f"temperature {args.temperature}, torch threads {torch.get_num_threads()}; "
          f"nucleus sizes {int(nucleus.min())}-{int(nucleus.max())} tokens (median {int(nucleus.median())})")
    print(f"  model decode step (forward, KV cache):  {forward_ms:8.1f} ms")
    for name, total in times.items():
        print(f"  {name:<38}  {total / args.repeats * 1000:8.1f} ms")
    old, new = times.values()
    print(f"  sampling speed-up: {old / new:.1f}x; tokens that differ: {differ} of {args.batch * args.repeats}")


if __name__ == "__main__":
    main()
