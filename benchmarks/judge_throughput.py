"""Judge throughput: one request at a time (the paper's annotator loop) vs the `openai` judge at
concurrency 16, against the same local OpenAI-compatible server with a fixed latency per request.

    .venv/bin/python benchmarks/judge_throughput.py [--pairs 200] [--latency 0.1] [--concurrency 16]

Prints pairs/s of each and the ratio (target: >= 10x). Both runs make the same requests with the
same prompts and parse the answers the same way; no cache is used.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fake_openai_server import FakeOpenAIServer  # noqa: E402

from rlphf_cli.jobs import judge_spec  # noqa: E402
from rlphf_cli.judges import JudgeRequest, get_judge, parse_verdict  # noqa: E402
from rlphf_cli.judges.base import TemplateSet  # noqa: E402
from rlphf_cli.preferences import PreferenceSet  # noqa: E402
from rlphf_cli.recipe import load_recipe  # noqa: E402

KEY_ENV = "RLPHF_BENCH_JUDGE_KEY"


def make_requests(n: int) -> list[JudgeRequest]:
    prefs = list(PreferenceSet.catalog())
    return [JudgeRequest(f"Explain topic {i} to me.", f"Short answer {i}.", f"A longer answer about topic {i}, "
                         "with background and examples.", prefs[i % len(prefs)], use="annotate") for i in range(n)]


def sequential(base_url: str, requests: list[JudgeRequest]) -> list[str]:
    """One request at a time with the official synchronous client."""
    from openai import OpenAI

    client = OpenAI(api_key=os.environ[KEY_ENV], base_url=base_url, max_retries=0, timeout=60)
    templates = TemplateSet()
    verdicts = []
    for request in requests:
        response = client.chat.completions.create(
            model="fake", messages=[{"role": "user", "content": templates.render(request)}],
            temperature=0.0, max_tokens=32,
        )
        verdicts.append(parse_verdict(response.choices[0].message.content or ""))
    client.close()
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault(KEY_ENV, "sk-benchmark")
    requests = make_requests(args.pairs)

    with FakeOpenAIServer(latency=args.latency) as server:
        start = time.perf_counter()
        seq = sequential(server.base_url, requests)
        seq_s = time.perf_counter() - start
        seq_requests = server.requests

        recipe = load_recipe(None, [f"judge.openai.base_url={server.base_url}", f"judge.openai.api_key_env={KEY_ENV}",
                                    f"judge.openai.concurrency={args.concurrency}"])
        judge = get_judge(judge_spec(recipe, "openai", recipe.preference_set()))  # no cache: every pair is a request
        server.reset_counts()
        start = time.perf_counter()
        ours = [j.verdict for j in judge.judge_many(requests)]
        ours_s = time.perf_counter() - start
        ours_requests = server.requests

    assert seq == ours, "the two runs disagree"
    assert seq_requests == ours_requests == args.pairs
    seq_rate, ours_rate = args.pairs / seq_s, args.pairs / ours_s
    print(f"{args.pairs} pairs, {args.latency * 1000:.0f} ms per request")
    print(f"sequential (1 at a time):    {seq_s:7.2f} s  {seq_rate:7.1f} pairs/s")
    print(f"openai judge (concurrency {args.concurrency}): {ours_s:7.2f} s  {ours_rate:7.1f} pairs/s")
    print(f"ratio: {ours_rate / seq_rate:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
