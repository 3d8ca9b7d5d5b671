"""`rlphf annotate`: pairs of rollouts labelled per preference by a judge, in TRL's preference format.

Rollouts come from `rlphf generate --num-samples N` (N >= 2): one record per prompt with a
`responses` list. Per prompt, up to `annotate.pairs_per_prompt` pairs of *distinct* samples are
drawn (identical samples cannot form a pair; they are counted). The same pairs are judged for every
preference; the order in which a pair is shown is drawn per preference with a seeded
random.Random, so position bias cannot line up with the data. Ties are dropped, invalid answers
are counted, and `annotations/<id>.jsonl` is written atomically with a `<id>.summary.json`.
The judge cache (`annotations/judge_cache.jsonl`) makes a rerun free.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path

from rlphf_cli import files
from rlphf_cli.errors import InputError, MissingArtifactError
from rlphf_cli.judges.base import JudgeRequest, ProgressFn
from rlphf_cli.runs import atomic_write_json, atomic_write_text
from rlphf_cli.specs import AnnotateJob
from rlphf_cli.specs import record as spec_record

CACHE_NAME = "judge_cache.jsonl"


def _rollout_problem(record: dict) -> str | None:
    responses = record.get("responses")
    if not isinstance(record.get("instruction"), str) or not isinstance(responses, list):
        return ("a rollout needs 'instruction' and a 'responses' list "
                "(make rollouts with: rlphf generate --num-samples 2)")
    if not all(isinstance(r, str) for r in responses):
        return "'responses' must be a list of strings"
    return None


def load_rollouts(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise MissingArtifactError("rollouts", path, f"rlphf generate --num-samples 2 --out {path}")
    records = files.read_jsonl(path, "rollout", check=_rollout_problem)
    if max(len(r["responses"]) for r in records) < 2:
        raise InputError(f"{path}: one sample per prompt; pairs need at least 2: "
                         f"rlphf generate --num-samples 2 --out {path}")
    return records


def form_pairs(records: list[dict], pairs_per_prompt: int, seed: int) -> tuple[list[dict], dict]:
    """Up to `pairs_per_prompt` pairs of distinct responses per prompt, drawn with a seeded RNG."""
    rng = random.Random(f"pairs:{seed}")
    pairs: list[dict] = []
    counts = {"prompts": len(records), "single_sample": 0, "identical_samples": 0}
    for n, record in enumerate(records):
        responses = [str(r) for r in record["responses"]]
        distinct = list(dict.fromkeys(responses))
        if len(responses) < 2:
            counts["single_sample"] += 1
            continue
        if len(distinct) < 2:
            counts["identical_samples"] += 1  # every sample the same: nothing to compare
            continue
        candidates = list(itertools.combinations(range(len(distinct)), 2))
        for i, j in rng.sample(candidates, min(pairs_per_prompt, len(candidates))):
            pairs.append({"id": str(record.get("id", n)), "instruction": str(record["instruction"]),
                          "first": distinct[i], "second": distinct[j]})
    return pairs, counts


def _judge_and_requests(job: AnnotateJob, judge=None, budget=None):
    """The job's judge (default: its spec's, with its cache in the output folder), checked for the
    job's preferences before any work, and the requests of every pair: the pairs are the same for every
    preference, the order in which a pair is shown is drawn per preference."""
    from rlphf_cli.judges import get_judge

    records = load_rollouts(job.rollouts)
    if judge is None:
        judge = get_judge(job.judge, cache_path=job.out_dir / CACHE_NAME, budget=budget)
    else:
        judge.use_cache(job.out_dir / CACHE_NAME)
    judge.check(list(job.criteria))  # before any work: a custom preference on the rubric judge fails here
    pairs, counts = form_pairs(records, job.pairs_per_prompt, job.seed)
    if not pairs:
        raise InputError(f"{job.rollouts}: no pair of distinct samples to annotate "
                         f"({counts['identical_samples']} prompts with identical samples)")
    requests = []
    for pref in job.criteria:
        order = random.Random(f"order:{job.seed}:{pref.id}")
        for pair in pairs:
            swap = order.random() < 0.5
            a, b = (pair["second"], pair["first"]) if swap else (pair["first"], pair["second"])
            requests.append(JudgeRequest(pair["instruction"], a, b, pref, use="annotate"))
    return judge, pairs, counts, requests


def plan_annotation(job: AnnotateJob):
    """The requests `annotate_rollouts(job)` would send after the cache, with their expected tokens
    and cost (a cost.RequestPlan); nothing is sent or written."""
    judge, _, _, requests = _judge_and_requests(job)
    return judge.plan(requests)


def annotate_rollouts(job: AnnotateJob, *, judge=None, progress: ProgressFn | None = None,
                      force: bool = False, budget=None) -> dict:
    """Label rollout pairs for each of the job's criteria; write `<out_dir>/<id>.jsonl` and
    `<id>.summary.json`.

    `judge`: a judge object (default: the job's judge, with its cache in the output folder).
    `progress(done, total)` is called as verdicts arrive. Annotations of the run directory are
    replaced only with `force`. `budget`: a cost.Budget shared with the command's other judges.
    Returns the summary of every preference.
    """
    from rlphf_cli.judges.cost import cost_record
    from rlphf_cli.runs import begin_outputs

    start = time.time()
    out_dir = job.out_dir
    preferences = list(job.criteria)
    judge, pairs, counts, requests = _judge_and_requests(job, judge, budget)
    begin_outputs(job.record, [out_dir / f"{pref.id}.jsonl" for pref in preferences], force=force,
                  hint="pass --force to label them again (verdicts so far are cached)")
    judgments = judge.judge_many(requests, progress=progress)

    summaries = {}
    for p, pref in enumerate(preferences):
        rows, info = [], {"pairs": len(pairs), "written": 0, "ties_dropped": 0, "invalid": 0, "failed": 0,
                          "first_shown_chosen": 0, "requests": 0, "cached": 0, "prompt_tokens": 0,
                          "completion_tokens": 0}
        for k, pair in enumerate(pairs):
            request, judgment = requests[p * len(pairs) + k], judgments[p * len(pairs) + k]
            for field in ("requests", "prompt_tokens", "completion_tokens"):
                info[field] += getattr(judgment, field)
            info["cached"] += judgment.cached
            if judgment.error is not None:
                info["failed"] += 1
            elif judgment.verdict == "invalid":
                info["invalid"] += 1
            elif judgment.verdict == "tie":
                info["ties_dropped"] += 1
            else:
                chosen, rejected = (request.a, request.b) if judgment.verdict == "A" else (request.b, request.a)
                info["first_shown_chosen"] += judgment.verdict == "A"
                rows.append({"prompt": pair["instruction"], "chosen": chosen, "rejected": rejected,
                             "id": pair["id"], "preference": pref.id})
        info["written"] = len(rows)
        info["cost"] = cost_record(judgments[p * len(pairs):(p + 1) * len(pairs)], judge.price)
        # Share of labels that went to the response shown first: ~0.5 unless the judge has a position bias.
        info["first_shown_rate"] = round(info.pop("first_shown_chosen") / len(rows), 4) if rows else None
        path = out_dir / f"{pref.id}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        summary = {"preference": pref.id, "path": str(path), "rollouts": str(job.rollouts), **counts, **info,
                   "judge": judge.describe(), "seed": job.seed, "pairs_per_prompt": job.pairs_per_prompt,
                   "settings": spec_record(job)}
        summaries[pref.id] = summary

    total = {"preferences": summaries, "pairs": len(pairs), **counts,
             "written": sum(s["written"] for s in summaries.values()),
             "ties_dropped": sum(s["ties_dropped"] for s in summaries.values()),
             "invalid": sum(s["invalid"] for s in summaries.values()),
             "failed": sum(s["failed"] for s in summaries.values()),
             "stats": judge.stats.to_dict(), "spend": judge.spend.to_dict(), "judge": judge.describe(),
             "out_dir": str(out_dir),
             "wall_s": round(time.time() - start, 3)}
    for summary in summaries.values():
        summary["wall_s"] = total["wall_s"]  # one batch served every preference
        atomic_write_json(out_dir / f"{summary['preference']}.summary.json", summary)
    return total
