"""Recipes: one YAML file describes a whole run.

Precedence, lowest first: built-in defaults < recipe file < `--set key.path=value` < explicit flags.
Every section forbids unknown keys. Trainer sub-sections (`train_rm.trl`, `train_policy.rloo`, ...)
hold TRL's own config field names, passed through and checked against the TRL dataclass.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from rlphf_cli import files
from rlphf_cli.data import BUILTIN_PREFIX, HUB_PREFIX
from rlphf_cli.errors import InputError, RecipeError, did_you_mean
from rlphf_cli.merging.methods import METHODS
from rlphf_cli.preferences import CATALOG, Preference, PreferenceSet
from rlphf_cli.specs import RECORD_ONLY  # a key that changes no verdict or output: left out of fingerprints


class Strict(BaseModel):
    # Frozen: a resolved recipe is read, never changed (a command's own settings go to its jobs).
    # validate_default: a default is held as its field's type (lora_alpha 32 -> 32.0), so a recipe reads
    # the same from its defaults and from its own recipe.yaml, and fingerprints agree.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelSection(Strict):
    # a built-in model (tiny, tiny-random, gemma-3-270m, gemma-3-270m-sft), a .gguf file, a local folder or a hub name
    name: str = "tiny"
    prompt_format: Literal["chat", "tulu"] = "chat"  # 'tulu': <|user|>\n{instruction}\n<|assistant|>\n
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    load_in_4bit: bool = False
    revision: str | None = None
    trust_remote_code: bool = False


class PreferenceDefinition(Strict):
    id: str
    alias: str
    dimension: str
    prompt: str
    criterion: str


def _split_names(value: Any) -> Any:
    """Accept 'P1A,concise' as well as a YAML list; 'all' stays 'all'."""
    if isinstance(value, str) and value != "all":
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class PreferencesSection(Strict):
    use: list[str] | Literal["all"] = "all"  # ids or aliases, from the catalog or `define`
    define: list[PreferenceDefinition] = Field(default_factory=list)

    _split = field_validator("use", mode="before")(_split_names)


class DataSection(Strict):
    # 'builtin:NAME' (shipped with the package), a local JSON/JSONL file or HF dataset folder,
    # or 'hf:owner/name[:split]' for a hub dataset.
    train_prompts: str = "builtin:tiny-train"
    eval_prompts: str = "builtin:tiny-eval"
    max_train_prompts: int | None = Field(default=None, ge=1)
    max_eval_prompts: int | None = Field(default=None, ge=1)


class GenerateSection(Strict):
    temperature: float = Field(default=1.0, ge=0)  # 0 means greedy
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    max_new_tokens: int = Field(default=64, ge=1)
    min_new_tokens: int = Field(default=0, ge=0)
    no_repeat_ngram_size: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)
    num_samples: int = Field(default=1, ge=1)
    batch_size: int = Field(default=32, ge=1)
    # How a soup's experts are composed: "params" merges their LoRA weights (the paper's soups),
    # "logits" mixes their next-token log-probabilities at every step (sum_i w_i log p_i).
    compose: Literal["params", "logits"] = "params"


class AnnotateSection(Strict):
    judge: str = "rubric"  # a judge backend name; its settings live under `judge.<name>`
    prefs: list[str] | Literal["all"] = "all"
    num_samples: int = Field(default=2, ge=2)  # rollouts per training prompt
    pairs_per_prompt: int = Field(default=1, ge=1)

    _split = field_validator("prefs", mode="before")(_split_names)


class LoraSection(Strict):
    r: int = Field(default=16, ge=1)
    lora_alpha: float = 32
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"


class TrainRMSection(Strict):
    lora: LoraSection = Field(default_factory=lambda: LoraSection(r=8, lora_alpha=32, lora_dropout=0.1))
    eval_fraction: float = Field(default=0.1, gt=0, lt=1)
    trl: dict[str, Any] = Field(default_factory=dict)  # trl.RewardConfig fields


class TrainPolicySection(Strict):
    algo: Literal["rloo", "grpo", "dpo"] = "rloo"  # mode multitask always trains with SFT
    mode: Literal["soup", "morl", "rlhf", "multitask"] = "soup"
    lora: LoraSection = Field(default_factory=LoraSection)
    rloo: dict[str, Any] = Field(default_factory=dict)  # trl.RLOOConfig fields
    grpo: dict[str, Any] = Field(default_factory=dict)  # trl.GRPOConfig fields
    dpo: dict[str, Any] = Field(default_factory=dict)  # trl.DPOConfig fields
    sft: dict[str, Any] = Field(default_factory=dict)  # trl.SFTConfig fields (mode multitask)
    save_steps: int | None = Field(default=None, ge=1)  # checkpoint every N steps (resume)
    # mode morl: standardize each reward model's scores (running mean / std) before their mean, so
    # separately trained reward models weigh alike whatever their scales.
    standardize_rewards: bool = True


class MergeSection(Strict):
    method: str = "average"
    rank: int | None = Field(default=None, ge=1)  # svd
    density: float | None = Field(default=None, gt=0, le=1)  # ties, dare
    seed: int = 0  # dare


class RubricJudgeSection(Strict):
    # Relative tie margins per measure; a pair whose measures differ by less is a tie.
    tie_margin: float = Field(default=0.05, ge=0)


class PriceSection(Strict):
    """USD per million tokens, as the provider bills them (none ships: prices change and differ)."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)


class OpenAIJudgeSection(Strict):
    base_url: str | None = None  # any OpenAI-compatible endpoint (vLLM, llama.cpp, Ollama)
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"  # the variable's *name*; the key itself is never stored
    concurrency: int = Field(default=16, ge=1)
    max_retries: int = Field(default=6, ge=0)
    timeout: float = Field(default=60.0, gt=0)
    parse_retries: int = Field(default=2, ge=0)
    temperature: float = Field(default=0.0, ge=0)
    max_tokens: int = Field(default=32, ge=1)  # per verdict: a request of N pairs may use N times as many
    price: PriceSection | None = Field(default=None, json_schema_extra=RECORD_ONLY)
    batch_size: int = Field(default=1, ge=1)  # pairs per request, numbered answers (AlpacaFarm's "b5" is 5)
    mode: Literal["chat", "batch"] = Field(default="chat", json_schema_extra=RECORD_ONLY)  # batch: the Batch API
    poll_interval: float = Field(default=30.0, gt=0, json_schema_extra=RECORD_ONLY)  # seconds between batch polls


class HFJudgeSection(Strict):
    model: str = "tiny"
    batch_size: int = Field(default=8, ge=1)


class CoinJudgeSection(Strict):
    seed: int = 0  # the `coin` judge's verdicts are a hash of this seed and the rendered prompt


class JudgeSection(Strict):
    backend: str = "rubric"
    templates: str | None = None  # folder of prompt templates overriding the shipped ones
    both_orders: bool = True
    bootstrap_samples: int = Field(default=1000, ge=0)
    max_cost: float | None = Field(default=None, gt=0)  # USD a command may spend on judge requests
    rubric: RubricJudgeSection = Field(default_factory=RubricJudgeSection)
    openai: OpenAIJudgeSection = Field(default_factory=OpenAIJudgeSection)
    hf: HFJudgeSection = Field(default_factory=HFJudgeSection)
    coin: CoinJudgeSection = Field(default_factory=CoinJudgeSection)


class SweepSection(Strict):
    prefs: list[str] = Field(default_factory=lambda: ["P2A", "P2B"], min_length=2, max_length=2)
    weights: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])


class ParetoSection(Strict):
    """Stage pareto: soups, decoding-time mixes and prompting alone between two preferences of two
    dimensions, each answer scored on both preferences' rubric measures."""

    prefs: list[str] = Field(default_factory=lambda: ["P2B", "P3A"], min_length=2, max_length=2)
    weights: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=2)


class ProfileSection(Strict):
    """How `rlphf profile learn` and serve's /v1/profiles read a user's picks (rlphf_cli.profiling)."""

    temperature: float = Field(default=0.3, gt=0)  # Bradley-Terry scale, in standardized reward-model units
    lapse: float = Field(default=0.2, ge=0, lt=1)  # share of picks that are noise
    tie_width: float = Field(default=0.15, ge=0)  # a utility gap below this is likely answered "about the same"
    bad_weight: float = Field(default=0.5, ge=0, le=1)  # "both bad" counts as this much of a tie
    particles: int = Field(default=4096, ge=64)
    grid: int = Field(default=3, ge=3)  # slider levels questions are asked with (odd: the middle is "none")


class EvaluationSection(Strict):
    # Systems compared against each baseline: 'psoups' plus any of base, prompted, multitask, morl, rlhf,
    # and psoups-decoding (the same experts mixed at decoding time instead of merged).
    baselines: list[Literal["base", "prompted", "multitask", "morl", "rlhf", "psoups-decoding"]] = Field(
        default_factory=lambda: ["base", "prompted"]
    )
    sweep: SweepSection | None = Field(default_factory=SweepSection)
    pareto: ParetoSection | None = None  # the pareto stage (off unless given)


class Recipe(Strict):
    name: str = "tiny"
    run_dir: str | None = None  # default: runs/<name>
    seed: int = 0
    parallel: int = Field(default=1, ge=1)  # worker processes for per-preference stages
    model: ModelSection = Field(default_factory=ModelSection)
    preferences: PreferencesSection = Field(default_factory=PreferencesSection)
    data: DataSection = Field(default_factory=DataSection)
    generate: GenerateSection = Field(default_factory=GenerateSection)
    annotate: AnnotateSection = Field(default_factory=AnnotateSection)
    train_rm: TrainRMSection = Field(default_factory=TrainRMSection)
    train_policy: TrainPolicySection = Field(default_factory=TrainPolicySection)
    merge: MergeSection = Field(default_factory=MergeSection)
    judge: JudgeSection = Field(default_factory=JudgeSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    profile: ProfileSection = Field(default_factory=ProfileSection)

    # Where the recipe came from, for messages; not part of the recipe itself.
    _source: str = "<defaults>"
    # Dotted keys set by --set or a command-line flag -> how ('--set train_rm.trl.x', ...).
    _overridden: dict[str, str] = PrivateAttr(default_factory=dict)
    # The recipe a run directory keeps (recipe.yaml) when a command's one-off flags differ from it.
    _run_yaml: str | None = None

    @model_validator(mode="after")
    def _check_preference_names(self) -> Recipe:
        names = self.known_preferences().names()
        for field, listed in (("preferences.use", self.preferences.use), ("annotate.prefs", self.annotate.prefs)):
            if listed == "all":
                continue
            for i, name in enumerate(listed):
                if name.lower() not in {n.lower() for n in names}:
                    raise _FieldError(f"{field}.{i}", f"unknown preference '{name}'{did_you_mean(name, names)}")
        if self.evaluation.sweep is not None:
            for i, name in enumerate(self.evaluation.sweep.prefs):
                if name.lower() not in {n.lower() for n in names}:
                    raise _FieldError(
                        f"evaluation.sweep.prefs.{i}", f"unknown preference '{name}'{did_you_mean(name, names)}"
                    )
        return self

    @model_validator(mode="after")
    def _check_merge_method(self) -> Recipe:
        from rlphf_cli.merging.methods import merge_spec

        name = self.merge.method
        if name == "logits":
            from rlphf_cli.merging.methods import LOGITS_NOT_A_MERGE

            raise _FieldError("merge.method", LOGITS_NOT_A_MERGE)
        if name not in METHODS:
            raise _FieldError("merge.method", f"unknown merge method '{name}'{did_you_mean(name, METHODS.names())}")
        try:  # the parameters the method declares, e.g. ties without a density
            merge_spec(name, self.merge.model_dump(exclude={"method"}))
        except InputError as exc:
            bad = next((p for p in METHODS.get(name).params if f"--{p}" in str(exc)), None)
            raise _FieldError(f"merge.{bad}" if bad and getattr(self.merge, bad) is not None else "merge.method",
                              str(exc)) from None
        return self

    @model_validator(mode="after")
    def _check_judges(self) -> Recipe:
        from rlphf_cli.judges import JUDGES

        for loc, name in (("annotate.judge", self.annotate.judge), ("judge.backend", self.judge.backend)):
            if name not in JUDGES:
                raise _FieldError(loc, f"unknown judge '{name}'{did_you_mean(name, JUDGES.names())}")
            if self.judge.max_cost is not None and JUDGES.get(name).priced and getattr(self.judge, name).price is None:
                raise _FieldError("judge.max_cost", f"the {name} judge ({loc}) has no price to count the spend at: "
                                  f"set judge.{name}.price.input and .output (USD per million tokens, as billed)")
        return self

    @property
    def source(self) -> str:
        return self._source

    def overrides(self) -> dict[str, Any]:
        """The values set by --set or a flag, by dotted key, as resolved."""
        dumped = self.model_dump(mode="json")
        out = {}
        for key in self._overridden:
            node: Any = dumped
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            out[key] = node
        return out

    def settings(self, *sections: str) -> dict:
        """Resolved recipe sections by name, for the record an output keeps of how it was made."""
        dumped = self.model_dump(mode="json")
        return {name: dumped[name] for name in sections}

    def origin(self, loc: str) -> str:
        """Where the value at dotted `loc` came from: the recipe file, or the --set/flag that set it."""
        return _origin_of(loc, self._overridden, self._source)

    def preference_set(self) -> PreferenceSet:
        """The preferences this recipe uses, in catalog order then definition order."""
        return self.known_preferences().subset(self.preferences.use)

    def known_preferences(self) -> PreferenceSet:
        """The catalog's preferences and the recipe's own, used or not."""
        return PreferenceSet(list(CATALOG) + [Preference(**d.model_dump()) for d in self.preferences.define])

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    def run_yaml(self) -> str:
        """What a run directory's recipe.yaml holds: the recipe with --set, without the one-off flags
        of the command that made the folder (its --max-cost or --judge are not the run's recipe)."""
        return self._run_yaml or self.to_yaml()

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        data["run_dir"] = str(self.resolved_run_dir())
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


class _FieldError(ValueError):
    """Raised inside validators to report a precise field path."""

    def __init__(self, loc: str, message: str):
        super().__init__(message)
        self.loc = loc
        self.message = message


# --------------------------------------------------------------------------------------------
# Loading and resolution


def builtin_recipes_dir() -> Path:
    return Path(str(resources.files("rlphf_cli") / "recipes"))


def find_recipe(path: str | os.PathLike | None) -> Path:
    """--recipe PATH, else $RLPHF_RECIPE, else ./rlphf.yaml, else the built-in tiny recipe.

    A bare name such as 'tiny' or 'psoups-paper' that is not a file names a built-in recipe.
    """
    if path is None:
        path = os.environ.get("RLPHF_RECIPE") or ("rlphf.yaml" if Path("rlphf.yaml").is_file() else None)
    if path is None:
        return builtin_recipes_dir() / "tiny.yaml"
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    builtin = builtin_recipes_dir() / f"{candidate.name.removesuffix('.yaml')}.yaml"
    if not candidate.suffix and builtin.is_file():
        return builtin
    names = sorted(p.stem for p in builtin_recipes_dir().glob("*.yaml"))
    hint = (f"; the built-in '{builtin.stem}' is named without a path: {builtin.stem}" if builtin.is_file()
            else f" (built-in recipes, named without a path: {', '.join(names)})")
    raise RecipeError(f"{path}: recipe file not found{hint}")


def parse_set(assignment: str) -> tuple[str, Any]:
    """'train_policy.lora.r=16' -> ('train_policy.lora.r', 16); the value is read as YAML."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {assignment}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_path(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


_TYPE_WORDS = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "an integer",
    "float_parsing": "a number", "float_type": "a number",
    "bool_parsing": "true or false", "bool_type": "true or false",
    "string_type": "a string", "dict_type": "a mapping", "model_type": "a mapping",
    "list_type": "a list",
}


def _message(err: dict) -> str:
    kind = err["type"]
    value = err.get("input")
    if kind in _TYPE_WORDS:
        return f"expected {_TYPE_WORDS[kind]}, got {_describe(value)}"
    if kind == "extra_forbidden":
        return "unknown key"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        limit = next(iter(err.get("ctx", {}).values()), "?")
        return f"expected a value {bounds[kind]} {limit}, got {_describe(value)}"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"expected one of {expected}, got {_describe(value)}"
    if kind == "value_error" and isinstance(err.get("ctx", {}).get("error"), _FieldError):
        return err["ctx"]["error"].message
    return f"{err['msg'].removeprefix('Value error, ')}, got {_describe(value)}"


def _loc(err: dict) -> str:
    ctx_error = err.get("ctx", {}).get("error")
    if isinstance(ctx_error, _FieldError):
        return ctx_error.loc
    # Union members ('list[str]', 'literal[...]') appear in pydantic's location; drop them.
    parts = [str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float")))]
    return ".".join(parts)


def _known_keys(model: type[BaseModel], loc: str) -> list[str]:
    """The valid keys at the parent of `loc` (for 'did you mean')."""
    node: Any = model
    for part in loc.split(".")[:-1]:
        field = getattr(node, "model_fields", {}).get(part)
        if field is None:
            return []
        node = field.annotation
        node = next((a for a in getattr(node, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)), node)
    return list(getattr(node, "model_fields", {}))


def _origin_of(loc: str, overridden: dict[str, str], source: str) -> str:
    """Name the place a bad value came from: the recipe file, or the --set/flag that set it."""
    for key, origin in overridden.items():
        if loc == key or loc.startswith(key + "."):
            return origin
    return source


def validate(data: Any, source: str, overridden: dict[str, str] | None = None) -> Recipe:
    """Build a Recipe from plain data; raise RecipeError with one line per problem."""
    overridden = overridden or {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a mapping of sections at the top level")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = _loc(err)
            message = _message(err)
            if err["type"] == "extra_forbidden":
                message += did_you_mean(loc.split(".")[-1], _known_keys(Recipe, loc))
            lines.append(f"{_origin_of(loc, overridden, source)}: {loc}: {message}")
        raise RecipeError("\n".join(dict.fromkeys(lines))) from None
    recipe._source = source
    recipe._overridden = dict(overridden)
    _check_files(recipe)
    return recipe


def _check_files(recipe: Recipe) -> None:
    def check(loc: str, value: str | None, kind: str = "file") -> None:
        if value is None or value.startswith((BUILTIN_PREFIX, HUB_PREFIX)):
            return
        if kind == "model" and not value.startswith((".", "/", "~")) and not Path(value).exists():
            return  # a hub name such as 'allenai/tulu-2-7b'
        if not Path(value).expanduser().exists():
            raise RecipeError(f"{recipe.origin(loc)}: {loc}: file not found: {value}")

    run_dir = recipe.resolved_run_dir().expanduser()
    blocked = next((p for p in [run_dir, *run_dir.parents] if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise RecipeError(f"{recipe.origin('run_dir')}: run_dir: {run_dir}: {blocked} is a file, not a folder")
    check("data.train_prompts", recipe.data.train_prompts)
    check("data.eval_prompts", recipe.data.eval_prompts)
    check("judge.templates", recipe.judge.templates)
    from rlphf_cli.models import BUILTIN_MODELS

    if recipe.model.name not in BUILTIN_MODELS:
        check("model.name", recipe.model.name, kind="model")


def load_recipe(
    path: str | os.PathLike | None = None,
    sets: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    origins: dict[str, str] | None = None,
    overlay: Callable[[Recipe, dict[str, str]], Recipe] | None = None,
) -> Recipe:
    """Resolve a recipe: file (or default) < `overlay` < --set assignments < explicit flags (`overrides`).

    `overrides` maps dotted recipe paths to flag values; None values mean "flag not given".
    `origins` names the flag of an override in messages (e.g. {'run_dir': '--run-dir'}).
    `overlay(recipe, overridden)` rewrites the validated recipe except the keys `overridden` names
    (what --set and the flags set), e.g. rlphf_cli.smoke.apply_smoke.
    """
    recipe_path = find_recipe(path)
    source = str(recipe_path)
    try:
        data = files.read_yaml(recipe_path, "recipe")
    except InputError as exc:
        raise RecipeError(str(exc)) from None
    data = copy.deepcopy(data) if isinstance(data, dict) else data
    overridden: dict[str, str] = {}
    if isinstance(data, dict):
        for assignment in sets or []:
            key, value = parse_set(assignment)
            _set_path(data, key, value)
            overridden[key] = f"--set {key}"
        for key, value in (overrides or {}).items():
            if value is not None:
                _set_path(data, key, value)
                overridden[key] = (origins or {}).get(key, f"option for {key}")
    recipe = validate(data, source, overridden)
    return overlay(recipe, overridden) if overlay is not None else recipe


# --------------------------------------------------------------------------------------------
# Settings that run but probably are not what the user meant


def recipe_warnings(recipe: Recipe) -> list[str]:
    """One line per setting that is valid but likely to skew results (printed, not refused)."""
    import dataclasses

    import trl

    from rlphf_cli.specs import TRAINERS

    out = []
    algo = recipe.train_policy.algo
    if TRAINERS[algo].online:
        section = getattr(recipe.train_policy, algo)
        default = next(f.default for f in dataclasses.fields(getattr(trl, TRAINERS[algo].config))
                       if f.name == "max_completion_length")
        length = section.get("max_completion_length", default)
        if isinstance(length, int) and length < recipe.generate.max_new_tokens:
            out.append(f"{recipe.source}: train_policy.{algo}.max_completion_length {length} < generate.max_new_tokens "
                       f"{recipe.generate.max_new_tokens}: RL completions are cut shorter than the answers evaluated, and cut "
                       "ones do not train the policy (mask_truncated_completions; clipped_ratio in training.json)")
    out += _emulated_bf16(recipe)
    return out


def _emulated_bf16(recipe: Recipe) -> list[str]:
    """`bf16: true` on a CPU without native bf16: CPU autocast then emulates it (a Gemma 3 270M
    reward-model step took minutes instead of 6.7 s in float32 on an AVX2-only CPU)."""
    from rlphf_cli.models.device import bf16_is_emulated

    if not bf16_is_emulated():
        return []
    algo = recipe.train_policy.algo
    sections = {"train_rm.trl": recipe.train_rm.trl, f"train_policy.{algo}": getattr(recipe.train_policy, algo)}
    out = []
    if recipe.model.dtype == "bfloat16":
        out.append(f"{recipe.source}: model.dtype bfloat16 on a CPU without native bf16 (no AVX512-BF16/AMX): every "
                   "matrix product is emulated, several times slower than float32; 'dtype: auto' is bfloat16 on GPUs only")
    for section, fields in sections.items():
        if fields.get("bf16") is True:
            out.append(f"{recipe.source}: {section}.bf16 true on a CPU without native bf16 (no AVX512-BF16/AMX): "
                       "autocast emulates it, many times slower than float32; 'bf16: auto' uses bf16 only where native")
    return out
