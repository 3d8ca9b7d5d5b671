"""`rlphf judge-check`: does a judge agree with people on each preference's criterion?

Labelled pairs are TRL preference rows with the preference they were labelled for: `prompt`,
`chosen` (the person's pick), `rejected`, `preference` (an id or alias), and optionally `id` and
`reason`. The judge asks every pair in both orders with its evaluate templates (three-way: a TIE is
allowed). Per preference:
- agreement with the labels: every verdict scores 1 when it picks `chosen`, 1/2 for a tie, 0 for
  `rejected`; a 95% bootstrap interval resampling pairs (both orders of a pair move together);
- position bias: the share of pairs whose verdict flips when the order is swapped, among pairs with
  two readable verdicts;
- the tie rate over every readable verdict, the unreadable ones, and the cost of the answers.

The shipped set (`shipped_labels()`) is the project's own writing: 20 pairs per built-in preference,
each chosen so that the criterion decides (the two answers differ on it and agree otherwise), with
the reason in `reason`.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from rlphf_cli import files
from rlphf_cli.errors import InputError, did_you_mean
from rlphf_cli.evaluation.winrate import summarize
from rlphf_cli.judges.base import JudgeRequest, ProgressFn
from rlphf_cli.preferences import PreferenceSet
from rlphf_cli.specs import JudgeCheckJob

FIELDS = ("prompt", "chosen", "rejected", "preference")
CACHE_DIR = "judge-check"  # under $RLPHF_HOME: verdicts are keyed by content, so every run may share them
# A verdict on (chosen, rejected) shown in that order; the swapped order is flipped back first.
OUTCOME = {"A": "win", "B": "loss", "tie": "tie", "invalid": "invalid"}
SWAPPED = {"A": "loss", "B": "win", "tie": "tie", "invalid": "invalid"}


def shipped_labels() -> Path:
    return Path(str(resources.files("rlphf_cli") / "judges" / "labels" / "judge-check.jsonl"))


def load_labels(path: str | Path, preferences: PreferenceSet) -> list[dict]:
    """The labelled rows of `path`, each with its preference resolved to an id; a bad row is one
    error naming the file and the line."""
    names = preferences.names()

    def problem(row: dict) -> str | None:
        for field in FIELDS:
            if not isinstance(row.get(field), str) or not row[field].strip():
                return f"a labelled pair needs a non-empty '{field}' ({', '.join(FIELDS)})"
        if row["preference"].lower() not in {n.lower() for n in names}:
            return f"unknown preference '{row['preference']}'{did_you_mean(row['preference'], names)}"
        if row["chosen"] == row["rejected"]:
            return "'chosen' and 'rejected' are the same text"
        return None

    rows = files.read_jsonl(path, "labelled pair", check=problem)
    if not rows:
        raise InputError(f"{path}: no labelled pairs")
    return [{**row, "id": str(row.get("id", n)), "preference": preferences.get(row["preference"]).id}
            for n, row in enumerate(rows)]


def _judge_and_requests(job: JudgeCheckJob, budget=None):
    """The job's judge, checked for the preferences labelled, the rows, and two requests per row:
    (chosen, rejected) shown in that order, then swapped."""
    from rlphf_cli.judges import get_judge

    preferences = PreferenceSet(job.preferences)
    rows = load_labels(job.labels, preferences)
    used = list(dict.fromkeys(preferences.get(row["preference"]) for row in rows))
    judge = get_judge(job.judge, cache_path=job.cache, budget=budget)
    judge.check(used)
    requests = [JudgeRequest(row["prompt"], a, b, preferences.get(row["preference"]), use="evaluate")
                for row in rows for a, b in ((row["chosen"], row["rejected"]), (row["rejected"], row["chosen"]))]
    return judge, rows, used, requests


def plan_check(job: JudgeCheckJob):
    """The requests `check_judge(job)` would send after the cache, with their tokens and cost."""
    judge, _, _, requests = _judge_and_requests(job)
    return judge.plan(requests)


def check_judge(job: JudgeCheckJob, *, progress: ProgressFn | None = None, budget=None) -> dict:
    """Run the job's judge on its labelled pairs in both orders; return per preference (and overall)
    agreement with its 95% interval, flip rate, tie rate, invalid verdicts and cost."""
    from rlphf_cli.judges.cost import cost_record

    start = time.time()
    judge, rows, used, requests = _judge_and_requests(job, budget)
    judgments = judge.judge_many(requests, progress=progress)

    def summary(indices: list[int]) -> dict:
        outcomes = [(OUTCOME[judgments[2 * i].verdict], SWAPPED[judgments[2 * i + 1].verdict]) for i in indices]
        scored = summarize([(rows[i]["id"], o) for i, pair in zip(indices, outcomes, strict=True) for o in pair],
                           job.bootstrap_samples, job.seed)
        readable = [pair for pair in outcomes if "invalid" not in pair]
        verdicts = [o for pair in outcomes for o in pair if o != "invalid"]
        return {"pairs": len(indices), "agreement": scored["win_rate"], "ci_low": scored["ci_low"],
                "ci_high": scored["ci_high"],
                "flip_rate": round(sum(a != b for a, b in readable) / len(readable), 4) if readable else None,
                "tie_rate": round(verdicts.count("tie") / len(verdicts), 4) if verdicts else None,
                "invalid": scored["invalid"],
                "cost": cost_record([judgments[2 * i + k] for i in indices for k in (0, 1)], judge.price)}

    per_pref = {pref.id: summary([i for i, row in enumerate(rows) if row["preference"] == pref.id]) for pref in used}
    return {"labels": str(job.labels), "judge": judge.describe(), "per_preference": per_pref,
            "overall": summary(list(range(len(rows)))), "stats": judge.stats.to_dict(),
            "spend": judge.spend.to_dict(), "wall_s": round(time.time() - start, 3)}
