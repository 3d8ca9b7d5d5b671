"""`rlphf train-policy`: Train one LoRA policy per preference with RL against its reward model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rlphf_cli.cli.common import (
    RecipeOption,
    RunDirOption,
    SetOption,
    WithDepsOption,
    cli_errors,
    console,
    ensure_inputs,
    resolve_recipe,
)
from rlphf_cli.cli.train_rm import ModelOption, training_progress
from rlphf_cli.errors import InputError


def _fmt(value, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


@cli_errors
def train_policy_command(
    prefs: Annotated[Optional[str], typer.Option("--prefs", "--pref", help="Mode soup: preference ids or aliases, "
                                                 "a comma list, or 'all' (no default: required in mode soup; the "
                                                 "other modes train one policy for all preferences). --pref is "
                                                 "the same option.", show_default=False)] = None,
    algo: Annotated[Optional[str], typer.Option("--algo", help="rloo | grpo | dpo (default: the recipe's).",
                                                show_default=False)] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="soup (one policy per preference) | morl | rlhf | "
                                                "multitask (default: the recipe's).", show_default=False)] = None,
    model: ModelOption = None,
    reward_model: Annotated[Optional[Path], typer.Option("--reward-model", help="Reward model folder (default: "
                                                         "<run-dir>/rm/<id>, or rm/general for rlhf).",
                                                         show_default=False)] = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", help="Training prompts: builtin:NAME, JSON/JSONL "
                                                   "file, dataset folder or hf:name (default: the recipe's).",
                                                   show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: <run-dir>/policy/<name>; "
                                                "with several preferences, a parent of <id>/).",
                                                show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint (saved every "
                                         "train_policy.save_steps and on Ctrl-C).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Train again, replacing the run directory's "
                                        "policy.")] = False,
    with_deps: WithDepsOption = True,
    recipe: RecipeOption = None,
    run_dir: RunDirOption = None,
    set_: SetOption = None,
) -> None:
    """Train one LoRA policy per preference with RL against its reward model.

    Mode soup trains the P-Soups experts with TRL's RLOO (or GRPO) against rm/<id>, a KL penalty
    to the base model (the adapter switched off); [bold]--algo dpo[/] trains from the annotations
    instead. [bold]--mode morl[/] trains one policy on prompts carrying sampled preference
    combinations (reward: mean of their reward models); [bold]--mode rlhf[/] one policy against
    rm/general; [bold]--mode multitask[/] one policy fine-tuned (TRL SFT) on the judge-chosen responses
    of every preference, each instruction carrying its preference prompt. Writes policy/<name>/ (PEFT adapter, metrics.jsonl). Multi-GPU:
    accelerate launch -m rlphf_cli train-policy ...

    Example: [bold]rlphf train-policy --pref concise[/] (its reward model, annotations and rollouts
    first, where missing)

    Example: [bold]rlphf train-policy --prefs concise --algo rloo[/]

    Example: [bold]rlphf train-policy --mode morl[/]
    """
    from rich.table import Table

    from rlphf_cli.jobs import policy_jobs
    from rlphf_cli.recipe import recipe_warnings
    from rlphf_cli.training import is_main_process
    from rlphf_cli.training.policy import train_policies

    resolved = resolve_recipe(recipe, set_, run_dir, model__name=model)
    if resume and force:
        raise InputError("--resume and --force: give one (--resume continues training, --force starts it over)")
    jobs = policy_jobs(resolved, prefs, mode=mode, algo=algo, reward_model=reward_model, prompts=prompts, out=out)
    ensure_inputs(resolved, jobs, with_deps)
    with training_progress(warnings=recipe_warnings(resolved)) as progress_factory:
        results = train_policies(jobs, resume=resume, progress_factory=progress_factory, force=force)
    if not is_main_process():
        return
    table = Table(title="policies")
    for column in ("policy", "algo", "steps", "reward start → end", "KL end", "length start → end", "clipped",
                   "s/step"):
        table.add_column(column, justify="left" if column in ("policy", "algo") else "right")
    for name, m in results.items():
        key = "reward" if "reward_start" in m else "margin"  # DPO logs its implicit reward margin
        trend = f"{_fmt(m.get(key + '_start'))} → {_fmt(m.get(key + '_end'))}" + (" (margin)" if key == "margin" else "")
        table.add_row(name, m["algo"], str(m["steps"]), trend, _fmt(m.get("kl_end"), ".4f"),
                      f"{_fmt(m.get('completion_length_start'), '.1f')} → {_fmt(m.get('completion_length_end'), '.1f')}",
                      _fmt(m.get("clipped_ratio_mean"), ".0%"), _fmt(m["s_per_step"]))
    console.print(table)
    for name, m in results.items():
        console.print(f"{name}: {m['out_dir']}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("train-policy")(train_policy_command)
