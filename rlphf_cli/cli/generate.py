"""`rlphf generate`: Generate responses with the base model, one adapter or a soup."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from rlphf_cli.cli.common import (
    RecipeOption,
    RunDirOption,
    SetOption,
    cli_errors,
    console,
    print_note,
    progress_bar,
    resolve_recipe,
)
from rlphf_cli.errors import InputError


def _opt(*names: str, help: str, **kw):
    return typer.Option(*names, help=help, show_default=False, **kw)


@cli_errors
def generate_command(
    model: Annotated[Optional[str], _opt("--model", help="A built-in model (tiny, tiny-random, gemma-3-270m, "
                                         "gemma-3-270m-sft), a .gguf file, a local folder or a hub name (model.name).")] = None,
    adapter: Annotated[Optional[str], _opt("--adapter", help="One LoRA adapter folder, or a preference name "
                                           "meaning the run's policy for it.")] = None,
    soup: Annotated[Optional[str], _opt("--soup", help="Merge the run's policies (or adapter folders): "
                                        "concise=0.7,friendly=0.3, P1A+P2A+P3A (equal shares) or one name.")] = None,
    adapters: Annotated[Optional[str], _opt("--adapters", help="Comma-separated adapter folders to merge.")] = None,
    weights: Annotated[Optional[str], _opt("--weights", help="Weights for --adapters, e.g. 0.7,0.3 (default: equal).")] = None,
    merge_method: Annotated[Optional[str], _opt("--merge-method", help="How a soup is merged (merge.method): "
                                                "average (the paper's), exact, svd, ties, dare.")] = None,
    compose: Annotated[Optional[str], _opt("--compose", help="How a soup's experts are composed (generate.compose): "
                                           "params (merge their weights, default) or logits (mix their next-token "
                                           "log-probabilities at every step; each expert runs).")] = None,
    prefs: Annotated[Optional[str], _opt("--prefs", help="The preferences the answers are for: their prompts are "
                                         "appended to each instruction, e.g. P1A,concise (default with --soup or "
                                         "--adapter: its preferences; 'none' for no prompt).")] = None,
    combos: Annotated[Optional[str], _opt("--combos", help="'all' or names like P1A+P2A+P3A: one file per combination.")] = None,
    prompts: Annotated[Optional[str], _opt("--prompts", help="Prompts: JSON/JSONL/HF dataset folder/builtin:NAME/hf:NAME "
                                           "(default: training prompts for rollouts, evaluation prompts otherwise).")] = None,
    limit: Annotated[Optional[int], _opt("--limit", help="Use only the first N prompts.", min=1)] = None,
    num_samples: Annotated[Optional[int], _opt("--num-samples", help="Responses per prompt (generate.num_samples; "
                                               "rollouts: annotate.num_samples).", min=1)] = None,
    out: Annotated[Optional[Path], _opt("--out", help="Output .jsonl (a folder with --combos). Default: the run "
                                        "directory's rollouts.jsonl or generations/<system>/<combo>.jsonl.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted output file (written with "
                                         "the same settings); its records are kept.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file (without --resume or "
                                        "--force one is never replaced).")] = False,
    system: Annotated[Optional[str], _opt("--system", help="System name written in the records (default: "
                                          "base, adapter:<name> or soup:<names>).")] = None,
    temperature: Annotated[Optional[float], _opt("--temperature", help="0 means greedy.", min=0)] = None,
    top_p: Annotated[Optional[float], _opt("--top-p", help="Nucleus sampling.")] = None,
    top_k: Annotated[Optional[int], _opt("--top-k", help="Top-k sampling (0: off).")] = None,
    max_new_tokens: Annotated[Optional[int], _opt("--max-new-tokens", help="Longest response in tokens.")] = None,
    min_new_tokens: Annotated[Optional[int], _opt("--min-new-tokens", help="Shortest response in tokens.")] = None,
    no_repeat_ngram_size: Annotated[Optional[int], _opt("--no-repeat-ngram-size", help="Forbid repeated n-grams.")] = None,
    repetition_penalty: Annotated[Optional[float], _opt("--repetition-penalty", help="> 1 discourages repeats.")] = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", help="Sequences decoded together.")] = None,
    seed: Annotated[Optional[int], _opt("--seed", help="Sampling seed (the recipe's seed).")] = None,
    recipe: RecipeOption = None,
    run_dir: RunDirOption = None,
    set_: SetOption = None,
) -> None:
    """Generate responses with the base model, one adapter or a soup.

    With no adapter, soup or preferences it writes the rollouts for annotation (training prompts,
    N samples each) to the run directory. An adapter or soup is merged into the weights first, so
    a soup decodes at the base model's speed; it is prompted with its preferences, as the
    evaluation and rlphf serve do. Records are appended as they are generated; --resume continues
    an interrupted file.

    Example: [bold]rlphf generate --soup concise=0.7,friendly=0.3[/]

    Example: [bold]rlphf generate --prefs concise,friendly[/] (the base model, prompted)

    Example: [bold]rlphf generate --combos all --num-samples 2[/]
    """
    from rlphf_cli import generation, jobs
    from rlphf_cli.runs import check_outputs
    from rlphf_cli.training import quiet_libraries

    quiet_libraries()  # no deprecation chatter from transformers/peft while a soup is merged in
    cfg = resolve_recipe(
        recipe, set_, run_dir, model__name=model, generate__temperature=temperature, generate__top_p=top_p,
        generate__top_k=top_k, generate__max_new_tokens=max_new_tokens, generate__min_new_tokens=min_new_tokens,
        generate__no_repeat_ngram_size=no_repeat_ngram_size, generate__repetition_penalty=repetition_penalty,
        generate__batch_size=batch_size, generate__num_samples=num_samples, seed=seed, merge__method=merge_method,
        generate__compose=compose,
    )
    given = [name for name, value in (("--adapter", adapter), ("--soup", soup), ("--adapters", adapters)) if value]
    if len(given) > 1:
        raise InputError(f"{' and '.join(given)}: give one of --adapter, --soup, --adapters")
    if compose == "logits" and not (soup or adapters):
        raise InputError("--compose logits mixes the experts of a soup: give --soup or --adapters")
    if weights and not adapters:
        raise InputError("--weights goes with --adapters (for --soup write name=weight)")
    if resume and force:
        raise InputError("--resume and --force: give one (--resume continues the file, --force starts it over)")
    members = generation.parse_soup(soup) if soup else None
    if adapters:
        members = generation.soup_from_adapters([a.strip() for a in adapters.split(",") if a.strip()],
                                                generation.parse_weights(weights) if weights else None)
    request = jobs.generate_request(cfg, adapter=adapter, soup=members, prefs=prefs, combos=combos, prompts=prompts,
                                    limit=limit, num_samples=num_samples, out=out, system=system,
                                    temperature_by="--temperature" if temperature is not None else None)
    for line in request.notes:
        print_note(line)
    # Everything the outputs depend on is known before the model loads: check them first.
    run = check_outputs(request.jobs[0].record, [job.out for job in request.jobs], force=force or resume,
                        hint="--resume continues it, --force replaces it, or write another --out", anywhere=True)
    bar, progress = _progress()
    with bar:
        summaries = generation.generate_files(request.jobs, resume=resume, progress=progress,
                                              after_load=lambda: run and run.begin(request.jobs[0].record))
    _print_summary(summaries, request.note)


def _progress():
    bar = progress_bar("{task.fields[rate]}")
    tasks: dict[str, tuple[int, float, int]] = {}  # label -> (task id, start time, tokens at start)

    def progress(label: str, done: int, total: int, tokens: int) -> None:
        import time

        if label not in tasks:
            tasks[label] = (bar.add_task(label, total=total, completed=done, rate=""), time.time(), tokens)
        task, start, _ = tasks[label]
        elapsed = time.time() - start
        rate = f"{tokens / elapsed:,.0f} tok/s" if elapsed > 0 and tokens else ""
        bar.update(task, completed=done, total=total, rate=rate)

    return bar, progress


def _print_summary(summaries: list[dict], note: str | None = None) -> None:
    table = Table(title=f"generate: {summaries[0]['system']}")
    for column in ("file", "prompts", "new", "resumed", "samples", "distinct", "tokens", "tok/s"):
        table.add_column(column, justify="left" if column == "file" else "right")
    for s in summaries:
        table.add_row(Path(s["path"]).name, str(s["prompts"]), str(s["generated"]), str(s["resumed"]),
                      str(s["num_samples"]), f"{s['distinct_fraction']:.0%}", f"{s['tokens']:,}",
                      f"{s['tokens_per_s']:,.0f}")
    console.print(table)
    folders = sorted({str(Path(s["path"]).parent) for s in summaries})
    where = summaries[0]["path"] if len(summaries) == 1 else ", ".join(folders)
    console.print(f"wrote {where}", soft_wrap=True, highlight=False)
    kept = sum(s["kept"] for s in summaries)
    if kept:
        console.print(f"kept {kept} records of prompts not asked for this time", highlight=False)
    if note:
        console.print(note, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
