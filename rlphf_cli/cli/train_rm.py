"""`rlphf train-rm`: Train one LoRA reward model per preference with TRL's RewardTrainer."""

from __future__ import annotations

import contextlib
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
    print_warnings,
    progress_bar,
    resolve_recipe,
)
from rlphf_cli.errors import InputError

ModelOption = Annotated[
    Optional[str], typer.Option("--model", help="Base model: a built-in model (tiny, tiny-random, gemma-3-270m, "
                                "gemma-3-270m-sft), a .gguf file, a folder or a hub name (default: the recipe's).",
                                show_default=False)
]


@contextlib.contextmanager
def training_progress(unit: str = "steps", warnings: list[str] | None = None):
    """A Rich progress bar; yields a factory: name -> progress(done, total, info) callback.
    `warnings` are printed when training starts (not before an input error)."""
    from rlphf_cli.training import is_main_process, quiet_libraries

    quiet_libraries()
    if not is_main_process():
        yield lambda name: None
        return
    with progress_bar(unit, "{task.fields[info]}", transient=False) as bar:
        def factory(name: str):
            task = None  # added on the first update, so an input error leaves no empty bar behind

            def update(done: int, total: int, info: dict | None = None) -> None:
                nonlocal task
                if task is None:  # training has started: the inputs were fine
                    if warnings:
                        print_warnings(warnings)
                        warnings.clear()
                    task = bar.add_task(name, total=None, info="")
                text = ""
                if info:
                    shown = [(k, info[k]) for k in ("reward", "kl", "completion_length", "loss", "accuracy", "margin")
                             if isinstance(info.get(k), (int, float))]
                    text = "  ".join(f"{k.replace('completion_length', 'len')} {v:.3g}" for k, v in shown[:3])
                bar.update(task, completed=done, total=total or None, info=text)

            return update

        yield factory


@cli_errors
def train_rm_command(
    prefs: Annotated[Optional[str], typer.Option("--prefs", "--pref", help="Preference ids or aliases, a comma list, "
                                                 "'all', or 'general' (the RLHF baseline); no default. --pref is the "
                                                 "same option.", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Annotations JSONL (default: the run directory's "
                                                 "annotations/<id>.jsonl).", show_default=False)] = None,
    model: ModelOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: <run-dir>/rm/<id>; with "
                                                "several preferences, a parent of <id>/).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Train again, replacing the run directory's reward "
                                        "model.")] = False,
    with_deps: WithDepsOption = True,
    recipe: RecipeOption = None,
    run_dir: RunDirOption = None,
    set_: SetOption = None,
) -> None:
    """Train one LoRA reward model per preference with TRL's RewardTrainer.

    Reads prompt/chosen/rejected pairs made by [bold]rlphf annotate[/], holds a seeded fraction out
    (train_rm.eval_fraction) and writes rm/<id>/: the adapter with its score head, the tokenizer,
    metrics.json (held-out pairwise accuracy, mean margin) and metrics.jsonl (one line per step).

    Example: [bold]rlphf train-rm --prefs concise[/]

    Example: [bold]rlphf train-rm --prefs all[/]
    """
    from rich.table import Table

    from rlphf_cli.jobs import reward_model_jobs
    from rlphf_cli.training import is_main_process
    from rlphf_cli.training.reward import train_reward_models

    if not prefs:
        raise InputError("give --prefs: a preference id or alias, a comma list, 'all' or 'general'")
    resolved = resolve_recipe(recipe, set_, run_dir, model__name=model)
    jobs = reward_model_jobs(resolved, prefs, data=data, out=out)
    ensure_inputs(resolved, jobs, with_deps)
    with training_progress() as progress_factory:
        results = train_reward_models(jobs, progress_factory=progress_factory, force=force)
    if not is_main_process():
        return
    table = Table(title="reward models")
    for column in ("preference", "held-out acc.", "mean margin", "pairs train/eval", "steps", "s/step"):
        table.add_column(column, justify="left" if column == "preference" else "right")
    for rm_id, m in results.items():
        table.add_row(rm_id, f"{m['accuracy']:.1%}", f"{m['mean_margin']:.3f}", f"{m['pairs_train']}/{m['pairs_eval']}",
                      str(m["steps"]), f"{m['s_per_step']:.3f}")
    console.print(table)
    for rm_id, m in results.items():
        console.print(f"{rm_id}: {m['out_dir']}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("train-rm")(train_rm_command)
