"""`rlphf merge`: Merge per-preference LoRA policies into a soup (adapter files only)."""

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
    one_progress_bar,
    print_note,
    resolve_recipe,
)


@cli_errors
def merge_command(
    adapters: Annotated[Optional[list[Path]], typer.Argument(
        help="Adapter folders (adapter_config.json + adapter_model.safetensors); or use --soup.",
        show_default=False)] = None,
    soup: Annotated[Optional[str], typer.Option(
        "--soup", help="The run's policies to merge, written as everywhere: elementary=0.4,concise=0.3,friendly=0.3, "
        "P1A+P2A+P3A (equal shares) or elementary,concise.", show_default=False)] = None,
    prefs: Annotated[Optional[str], typer.Option("--prefs", hidden=True, show_default=False)] = None,
    weights: Annotated[Optional[str], typer.Option(
        "--weights", help="One weight per adapter folder, e.g. 0.4,0.3,0.3 (default: uniform).",
        show_default=False)] = None,
    method: Annotated[Optional[str], typer.Option(
        "--method", "--merge-method", help="average (the paper's; default) | exact | svd | ties | dare.",
        show_default=False)] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="svd: output rank (default: largest input rank).",
                                                show_default=False)] = None,
    density: Annotated[Optional[float], typer.Option("--density", help="ties, dare: fraction of entries kept.",
                                                     show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="dare: seed of the drop masks.",
                                                show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Output folder (default with --soup: <run-dir>/soups/<combo>/, with the weights in the name "
        "unless equal).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing soup of the run directory; merge "
                                        "adapters whose base_model_name_or_path differ.")] = False,
    into_base: Annotated[Optional[Path], typer.Option(
        "--into-base", help="Also write a full model with the soup merged into the base weights (loads the base).",
        show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Base model for --into-base (default: the adapters' base_model_name_or_path).",
        show_default=False)] = None,
    compose: Annotated[Optional[str], typer.Option(
        "--compose", help="params (a soup: the only way merge composes); logits mixes at decoding time, in "
        "rlphf generate and serve.", show_default=False)] = None,
    with_deps: WithDepsOption = True,
    recipe: RecipeOption = None,
    run_dir: RunDirOption = None,
    set_: SetOption = None,
) -> None:
    """Merge per-preference LoRA policies into a soup (adapter files only).

    Example: [bold]rlphf merge --soup elementary=0.4,concise=0.3,friendly=0.3[/]

    Example: [bold]rlphf merge --weights 0.5,0.5[/] (the run's two trained policies)

    Example: [bold]rlphf merge a/ b/ --weights 0.7,0.3 --out soup/[/]
    """
    from rlphf_cli.errors import InputError
    from rlphf_cli.jobs import merge_request
    from rlphf_cli.merging import run_merge

    if compose not in (None, "params", "logits"):
        raise InputError(f"--compose: '{compose}' is not params or logits")
    if compose == "logits":
        method = "logits"  # refused with the one reason by the method lookup, like --method logits

    resolved = resolve_recipe(recipe, set_, run_dir, merge__method=method, merge__rank=rank,
                              merge__density=density, merge__seed=seed, model__name=model)
    explicit = [name for name, value in (("rank", rank), ("density", density), ("seed", seed)) if value is not None]
    job, note = merge_request(resolved, adapters=adapters or [], soup=soup, prefs=prefs, weights=weights, out=out,
                              into_base=into_base, base_model=resolved.model.name if model else None,
                              explicit=explicit, check_inputs=False)
    if job.labels:  # a soup of the run's policies: those missing are trained first, unless --no-deps
        ensure_inputs(resolved, [job], with_deps)
    print_note(note)
    with one_progress_bar("merging") as update:
        card = run_merge(job, force=force, replace=force, progress=update)
    _print_card(card)


def _print_card(card: dict) -> None:
    from rich.table import Table

    table = Table(title=f"soup: {card['method']}", title_justify="left")
    for column in ("input", "weight given", "weight used", "r", "alpha"):
        table.add_column(column, justify="left" if column == "input" else "right")
    names = card.get("preferences") or [Path(i["path"]).name for i in card["inputs"]]
    for name, item, given, used in zip(names, card["inputs"], card["weights"], card["weights_used"], strict=True):
        table.add_row(str(name), f"{given:g}", f"{used:.4g}", str(item["r"]), f"{item['lora_alpha']:g}")
    console.print(table)
    if any(abs(g - u) > 1e-12 for g, u in zip(card["weights"], card["weights_used"], strict=True)):
        console.print(f"the weights were normalized to sum to 1 (method {card['method']} takes a weighted mean)",
                      highlight=False)
    params = ", ".join(f"{k}={v}" for k, v in card["parameters"].items())
    console.print(f"output rank {card['output']['r']} (alpha {card['output']['lora_alpha']:g}), "
                  f"{card['output']['lora_modules']} LoRA modules{f', {params}' if params else ''}, "
                  f"{card['seconds']:.2f} s")
    if "stats" in card and "relative_truncation_error_max" in card["stats"]:
        console.print(f"svd relative truncation error: max {card['stats']['relative_truncation_error_max']:.3g}")
    console.print(f"[green]wrote[/] {card['out']}")
    if card.get("into_base"):
        console.print(f"[green]wrote[/] {card['into_base']} (full model)")


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_command)
