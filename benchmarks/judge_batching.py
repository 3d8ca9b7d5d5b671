"""Batched prompts: the `openai` judge asking 1 pair a request vs N (the paper's annotator asked 5),
against the same local OpenAI-compatible server, whose verdict for a pair depends on the pair alone.

    .venv/bin/python benchmarks/judge_batching.py [--batch-size 5] [--repeat 1]

The pairs are the shipped judge-check set (120 pairs, 20 per built-in preference), asked as
`annotate` asks them (one order, two-way) and as `judge` does (both orders, three-way): 360 verdicts.
Prints the requests and the input per verdict of each run (the server's usage, which counts words,
and the characters sent, which do not depend on a tokenizer), and the ratios. The verdicts must be
identical. No cache: every verdict is asked.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fake_openai_server import FakeOpenAIServer  # noqa: E402

from rlphf_cli.jobs import judge_spec  # noqa: E402
from rlphf_cli.judges import JudgeRequest, get_judge  # noqa: E402
from rlphf_cli.judges.check import load_labels, shipped_labels  # noqa: E402
from rlphf_cli.preferences import PreferenceSet  # noqa: E402
from rlphf_cli.recipe import load_recipe  # noqa: E402

KEY_ENV = "RLPHF_BENCH_JUDGE_KEY"


def make_requests(repeat: int) -> list[JudgeRequest]:
    prefs = PreferenceSet.catalog()
    rows = load_labels(shipped_labels(), prefs) * repeat
    requests = []
    for n, row in enumerate(rows):
        pref, tag = prefs.get(row["preference"]), f" (#{n})" if repeat > 1 else ""
        first, second = (row["chosen"], row["rejected"]) if n % 2 else (row["rejected"], row["chosen"])
        requests.append(JudgeRequest(row["prompt"] + tag, first, second, pref, use="annotate"))
        requests += [JudgeRequest(row["prompt"] + tag, a, b, pref, use="evaluate")
                     for a, b in ((row["chosen"], row["rejected"]), (row["rejected"], row["chosen"]))]
    return requests


def run(server: FakeOpenAIServer, requests: list[JudgeRequest], batch_size: int) -> dict:
    recipe = load_recipe(None, [f"judge.openai.base_url={server.base_url}", f"judge.openai.api_key_env={KEY_ENV}",
                                f"judge.openai.batch_size={batch_size}"])
    judge = get_judge(judge_spec(recipe, "openai", list(recipe.preference_set())))  # no cache
    server.reset_counts()
    verdicts = [j.verdict for j in judge.judge_many(requests)]
    # judge.rate: the characters and input tokens of every answered request, for its token estimates
    return {"verdicts": verdicts, "requests": server.requests, "tokens": judge.spend.prompt_tokens,
            "chars": judge.rate.chars}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1, help="ask the set this many times (distinct prompts)")
    args = parser.parse_args()
    os.environ.setdefault(KEY_ENV, "sk-benchmark")
    requests = make_requests(args.repeat)
    with FakeOpenAIServer() as server:
        single = run(server, requests, 1)
        batched = run(server, requests, args.batch_size)
    assert single["verdicts"] == batched["verdicts"], "batched verdicts differ from single ones"
    n = len(requests)
    print(f"{n} verdicts ({n // 3} labelled pairs: annotate once, judge in both orders); verdicts identical: yes")
    for name, r in (("1 pair a request", single), (f"{args.batch_size} pairs a request", batched)):
        print(f"{name:>18}: {r['requests']:5d} requests, {r['tokens'] / n:7.1f} input tokens (words) and "
              f"{r['chars'] / n:7.1f} characters per verdict")
    print(f"ratio {args.batch_size} to 1: input tokens per verdict {batched['tokens'] / single['tokens']:.2f}, "
          f"characters {batched['chars'] / single['chars']:.2f}, requests {batched['requests'] / single['requests']:.2f}")


if __name__ == "__main__":
    main()
