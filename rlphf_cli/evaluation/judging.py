"""`rlphf judge`: system A's generations against system B's, pairwise, one criterion at a time.

Records are matched by (id, combo). Each pair is judged on its criteria (by default, the
preferences of its combination) in both orders (`judge.both_orders`): A wins only when both orders
agree; a disagreement is a tie, and the agreement rate is reported. Results: win / tie / loss,
win rate (ties half) with a bootstrap 95% interval, per criterion, per combination and overall,
as a JSON file and a Markdown table next to it (same stem, .md). The judge cache sits next to them.

Either side may be one JSONL file or a folder of per-combination JSONL files (`generations/<system>/`);
two folders are matched by file name, then by (id, combo) inside.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from rlphf_cli import files
from rlphf_cli.errors import InputError, MissingArtifactError
from rlphf_cli.evaluation.winrate import summarize
from rlphf_cli.judges.base import JudgeRequest, ProgressFn
from rlphf_cli.preferences import PreferenceSet
from rlphf_cli.runs import atomic_write_json, atomic_write_text
from rlphf_cli.specs import Criterion, JudgeJob
from rlphf_cli.specs import record as spec_record

CACHE_NAME = "judge_cache.jsonl"
FLIP = {"A": "B", "B": "A", "tie": "tie", "invalid": "invalid"}
OUTCOME = {"A": "win", "B": "loss", "tie": "tie", "invalid": "invalid"}


Paths = str | Path | Sequence[str | Path]


def _as_list(paths: Paths) -> list[Path]:
    return [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]


def load_generations(paths: Paths) -> dict[str, list[dict]]:
    """{file name: records} for a JSONL file, a folder of them, or a list of files."""
    found_files: list[Path] = []
    for path in _as_list(paths):
        if path.is_dir():
            found = sorted(path.glob("*.jsonl"))
            if not found:
                raise InputError(f"{path}: no .jsonl generation files in the folder")
            found_files += found
        elif path.is_file():
            found_files.append(path)
        else:
            raise MissingArtifactError("generations", path, f"rlphf generate --out {path}")
    out = {}
    for file in found_files:
        out[str(file)] = files.read_jsonl(file, "generation", check=_generation_problem)
    return out


def _generation_problem(record: dict) -> str | None:
    if "id" not in record or not (record.get("response") is not None or record.get("responses")):
        return "a generation needs 'id' and 'response'"
    if not isinstance(record.get("response") or "", str):
        return "'response' is not a string"
    return None


def _key(record: dict) -> tuple[str, str]:
    combo = record.get("combo")
    if combo is None:
        combo = "+".join(record.get("preferences") or [])
    return str(record["id"]), str(combo)


def _index(files: dict[str, list[dict]], where: str | Path) -> dict[tuple[str, str], dict]:
    index: dict[tuple[str, str], dict] = {}
    for records in files.values():
        for record in records:
            key = _key(record)
            if key in index:
                raise InputError(f"{where}: id '{key[0]}' appears twice for combination '{key[1]}'")
            index[key] = record
    return index


def _is_dir(paths: Paths) -> bool:
    return isinstance(paths, (str, Path)) and Path(paths).is_dir()


def _label(paths: Paths) -> str:
    listed = _as_list(paths)
    return str(listed[0]) if len(listed) == 1 else f"{listed[0].parent}/{{{','.join(p.name for p in listed)}}}"


def _describe_keys(keys: list[tuple[str, str]]) -> str:
    first = sorted(keys)[0]
    return f"{len(keys)} (e.g. id '{first[0]}', combination '{first[1] or 'none'}')"


def _broadcast(index: dict[tuple[str, str], dict], combos: list[str]) -> dict[tuple[str, str], dict]:
    """Answers made without a preference prompt (the base model's plain.jsonl) are the same whatever
    the combination: label them with each combination of the other side."""
    if not index or any(combo for _, combo in index) or not any(combos):
        return index
    return {(rid, combo): {**record, "combo": combo} for (rid, _), record in index.items() for combo in combos}


def match_records(a_path: Paths, b_path: Paths, common: bool = False) -> tuple[list[tuple[dict, dict]], dict]:
    """(record of A, record of B) for every (id, combo), or a one-line InputError; with `common`,
    the shared (id, combo) keys only. Returns (pairs, {"only_a": n, "only_b": n})."""
    a_files, b_files = load_generations(a_path), load_generations(b_path)
    a_names, b_names = {Path(f).name for f in a_files}, {Path(f).name for f in b_files}
    if _is_dir(a_path) and _is_dir(b_path) and a_names != b_names and not common:
        only_a, only_b = sorted(a_names - b_names), sorted(b_names - a_names)
        raise InputError(f"{_label(a_path)} and {_label(b_path)} hold different files: only in A: {', '.join(only_a) or '-'}; "
                         f"only in B: {', '.join(only_b) or '-'} (--common judges the shared records)")
    a_index, b_index = _index(a_files, _label(a_path)), _index(b_files, _label(b_path))
    a_index = _broadcast(a_index, sorted({combo for _, combo in b_index}))
    b_index = _broadcast(b_index, sorted({combo for _, combo in a_index}))
    only_a, only_b = set(a_index) - set(b_index), set(b_index) - set(a_index)
    if (only_a or only_b) and not common:
        parts = [f"{_describe_keys(list(only_a))} only in A" if only_a else "",
                 f"{_describe_keys(list(only_b))} only in B" if only_b else ""]
        raise InputError(f"{_label(a_path)} and {_label(b_path)} do not match by (id, combination): "
                         + "; ".join(p for p in parts if p) + " (--common judges the shared records)")
    pairs = []
    for key in sorted(set(a_index) & set(b_index)):
        a, b = a_index[key], b_index[key]
        if a.get("instruction") != b.get("instruction"):
            raise InputError(f"{_label(a_path)} and {_label(b_path)}: id '{key[0]}' has different instructions")
        pairs.append((a, b))
    if not pairs:
        raise InputError(f"{_label(a_path)} and {_label(b_path)} share no (id, combination) record")
    return pairs, {"only_a": len(only_a), "only_b": len(only_b)}


def _response(record: dict) -> str:
    return str(record["response"] if record.get("response") is not None else record["responses"][0])


def _criteria_for(pref_set: PreferenceSet, a: dict, b: dict, criteria) -> list[Criterion]:
    if criteria in (None, "combo"):
        # The record's own preferences; a baseline record relabelled with a combination has only `combo`.
        for record in (a, b):
            names = record.get("preferences") or [n for n in str(record.get("combo") or "").split("+") if n]
            if names:
                return [pref_set.get(n) for n in names]
        return []
    return pref_set.resolve(criteria)


class _Asked(NamedTuple):
    a_path: Path | list[Path]
    b_path: Path | list[Path]
    pairs: list[tuple[dict, dict]]  # matched records
    left_out: dict
    used: list[Criterion]  # the criteria judged
    cells: list[tuple[dict, Criterion]]  # (A's record, criterion), one per judgment (per order pair)
    requests: list[JudgeRequest]


def _judge_and_requests(job: JudgeJob, judge=None, budget=None) -> tuple:
    """The job's judge (default: its spec's, cached in `<out folder>/judge_cache.jsonl`), checked for
    the criteria used, and what it is asked (_Asked)."""
    from rlphf_cli.judges import get_judge

    a_path, b_path = _one_or_list(job.a), _one_or_list(job.b)
    pairs, left_out = match_records(a_path, b_path, job.common)
    pref_set = PreferenceSet(job.preferences)
    per_pair = [_criteria_for(pref_set, a, b, job.criteria) for a, b in pairs]
    used = list(dict.fromkeys(p for prefs in per_pair for p in prefs))
    if not used:
        raise InputError(f"{_label(a_path)}: the records carry no preferences (combination none); "
                         "pass --criteria P1A,P2A or --criteria all")
    cache_path = Path(job.out).parent / CACHE_NAME if job.out is not None else None
    if judge is None:
        judge = get_judge(job.judge, cache_path=cache_path, budget=budget)
    else:
        judge.use_cache(cache_path)
    judge.check(used)
    requests: list[JudgeRequest] = []
    cells: list[tuple[dict, Criterion]] = []
    for (a, b), prefs in zip(pairs, per_pair, strict=True):
        for pref in prefs:
            cells.append((a, pref))
            instruction = str(a.get("instruction", ""))
            requests.append(JudgeRequest(instruction, _response(a), _response(b), pref, use="evaluate"))
            if job.both_orders:
                requests.append(JudgeRequest(instruction, _response(b), _response(a), pref, use="evaluate"))
    return judge, _Asked(a_path, b_path, pairs, left_out, used, cells, requests)


def plan_judgment(job: JudgeJob):
    """The requests `judge_files(job)` would send after the cache, with their expected tokens and
    cost (a cost.RequestPlan); nothing is sent or written."""
    judge, asked = _judge_and_requests(job)
    return judge.plan(asked.requests)


def judge_files(job: JudgeJob, *, judge=None, progress: ProgressFn | None = None, force: bool = False,
                budget=None) -> dict:
    """Judge system A's generations against system B's; write `job.out` (JSON) and its `.md`.

    `job.a`/`job.b`: a generation JSONL file each, a folder of per-combination files each (matched
    by file name), or files each; records are matched by (id, combo) across them. A side whose
    records carry no combination (the base model's plain answers) matches every combination of the
    other. `job.common`: judge the shared records only (the result says how many were left out).
    `job.criteria`: 'combo' (each record's own preferences), 'all', or names ('P1A', 'P2A').
    `judge`: a judge object (default: the job's), cached in `<out folder>/judge_cache.jsonl`. A
    judgment of the run directory is replaced only with `force`. `budget`: a cost.Budget shared
    with the command's other judges. Returns the result written.
    """
    from rlphf_cli.judges.cost import cost_record
    from rlphf_cli.runs import begin_outputs

    start = time.time()
    out_path, criteria, both = job.out, job.criteria, job.both_orders
    judge, (a_path, b_path, pairs, left_out, used, cells, requests) = _judge_and_requests(job, judge, budget)
    if out_path is not None:
        begin_outputs(job.record, [Path(out_path), Path(out_path).with_suffix(".md")], force=force,
                      hint="pass --force to judge again (verdicts are cached), or --out")
    judgments = judge.judge_many(requests, progress=progress)

    items = []
    step = 2 if both else 1
    for n, (record, pref) in enumerate(cells):
        verdicts = [judgments[n * step].verdict] + ([FLIP[judgments[n * step + 1].verdict]] if both else [])
        outcomes = [OUTCOME[v] for v in verdicts]
        if "invalid" in outcomes:
            outcome, agree = "invalid", None
        else:
            agree = len(set(outcomes)) == 1 if both else None
            outcome = outcomes[0] if len(set(outcomes)) == 1 else "tie"
        key = _key(record)
        # verdicts: one per order, from A's side ("A" = system A's response was preferred).
        items.append({"id": key[0], "combo": key[1], "criterion": pref.id, "outcome": outcome,
                      "verdicts": verdicts, "agree": agree,
                      "failed": any(judgments[n * step + k].error for k in range(step))})

    samples, seed = job.bootstrap_samples, job.seed
    result = {
        "a": _label(a_path), "b": _label(b_path),
        "system_a": system_name(pairs[0][0], a_path), "system_b": system_name(pairs[0][1], b_path),
        "judge": judge.describe(), "both_orders": both,
        "criteria": criteria if isinstance(criteria, str) else ",".join(criteria),
        "pairs": len(pairs), "left_out": left_out, "judgments": len(items),
        "settings": spec_record(job),
        "overall": _summary(items, samples, seed),
        "per_criterion": {p.id: _summary([i for i in items if i["criterion"] == p.id], samples, seed) for p in used},
        "per_combo": {},
        "stats": judge.stats.to_dict(),
        "spend": judge.spend.to_dict(),
        "cost": cost_record(judgments, judge.price),
    }
    for combo in dict.fromkeys(i["combo"] for i in items):
        in_combo = [i for i in items if i["combo"] == combo]
        result["per_combo"][combo] = {
            **_summary(in_combo, samples, seed),
            "per_criterion": {c: _summary([i for i in in_combo if i["criterion"] == c], samples, seed)
                              for c in dict.fromkeys(i["criterion"] for i in in_combo)},
        }
    result["wall_s"] = round(time.time() - start, 3)
    result["items"] = items
    if out_path is not None:
        out_path = Path(out_path)
        atomic_write_json(out_path, result)
        atomic_write_text(out_path.with_suffix(".md"), markdown(result))
        result["markdown"] = str(out_path.with_suffix(".md"))
    return result


def _one_or_list(paths: tuple[Path, ...]) -> Path | list[Path]:
    return paths[0] if len(paths) == 1 else list(paths)


def default_out(run, a_path: str | Path, b_path: str | Path) -> Path:
    """judgments/<system A>_vs_<system B>.json, each side named as the report names its system: a
    folder by its name (generations/<system>/), a file by the system its records carry (the soup's
    weights, psoups:<combo>, base, ...), so that two different comparisons never share a file."""
    a_name, b_name = _side_name(Path(a_path)), _side_name(Path(b_path))
    if a_name == b_name:  # one system against itself (other settings): the files tell them apart
        a_name, b_name = (_side_name(Path(p), f"{Path(p).parent.name}-{Path(p).stem}") for p in (a_path, b_path))
    return run.judgment(a_name, b_name)


def _side_name(path: Path, name: str | None = None) -> str:
    """`name` (default: the folder's name, or the system the file's records carry, or its stem)."""
    import json
    import re

    if name is not None:
        return re.sub(r"[\\/:\s]+", "-", name)
    name = path.name if path.is_dir() else path.stem
    try:
        with open(path, encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "{}")
        name = str(json.loads(first).get("system") or name)
    except (OSError, ValueError, AttributeError):
        pass  # a folder, or a file the job reports on with its own error
    return re.sub(r"[\\/:\s]+", "-", name)


def system_name(record: dict, path: Paths) -> str:
    first = _as_list(path)[0]
    return str(record.get("system") or (first.name if first.is_dir() else first.stem))


def _summary(items: list[dict], samples: int, seed: int) -> dict:
    # The bootstrap resamples prompts, each with every combination and criterion it was judged on:
    # the evaluation set is a sample of prompts, and one prompt's outcomes move together (the base
    # model's answer is the same in every combination).
    summary = summarize([(i["id"], i["outcome"]) for i in items], samples, seed)
    judged = [i["agree"] for i in items if i["agree"] is not None]
    summary["agreement"] = round(sum(judged) / len(judged), 4) if judged else None
    summary["failed"] = sum(i["failed"] for i in items)
    return summary


def rows(result: dict) -> Iterator[tuple[str, dict]]:
    """(scope, summary) in display order: overall, per criterion, per combination."""
    yield "overall", result["overall"]
    for name, summary in result["per_criterion"].items():
        yield name, summary
    if len(result["per_combo"]) > 1:
        for combo, summary in result["per_combo"].items():
            yield f"combo {combo or 'none'}", summary


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_ci(summary: dict) -> str:
    if summary["ci_low"] is None:
        return "-"
    return f"{100 * summary['ci_low']:.1f}-{100 * summary['ci_high']:.1f}%"


def markdown(result: dict) -> str:
    judge = result["judge"]
    lines = [
        f"# {result['system_a']} vs {result['system_b']}",
        "",
        f"Judge: {judge['backend']}" + (f" ({judge['model']})" if judge.get("model") else "")
        + f"; both orders: {'yes' if result['both_orders'] else 'no'}; {result['pairs']} matched records. "
        "Win rate of A: ties count half; 95% bootstrap interval resampling prompts (each with all its "
        "combinations and criteria)."
        + (" Both orders must agree for a win or a loss." if result["both_orders"] else ""),
        "",
        "| scope | wins | ties | losses | invalid | win rate | 95% CI | order agreement |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for scope, s in rows(result):
        lines.append(f"| {scope} | {s['wins']} | {s['ties']} | {s['losses']} | {s['invalid']} | "
                     f"{_pct(s['win_rate'])} | {format_ci(s)} | {_pct(s['agreement'])} |")
    criteria = list(result["per_criterion"])
    if len(result["per_combo"]) > 1:
        lines += ["", "Win rate per combination and criterion:", "",
                  "| combination | " + " | ".join(criteria) + " |", "|---|" + "---:|" * len(criteria)]
        for combo, summary in result["per_combo"].items():
            cells = [_pct(summary["per_criterion"][c]["win_rate"]) if c in summary["per_criterion"] else ""
                     for c in criteria]
            lines.append(f"| {combo or 'none'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
