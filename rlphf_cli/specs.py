"""Job specs: everything one piece of work reads, resolved once from a frozen recipe.

A library function takes its spec, never the recipe: a reward-model job, a policy job, a generate
job, an annotate job, a judge job, a merge spec, the model spec. Specs are frozen dataclasses of
plain values, built by rlphf_cli.jobs (the one place that reads a recipe and checks it), so every
check happens before any work, where the origin of each value is known.

`fingerprint(spec)` hashes what the work reads; a pipeline unit's fingerprint is its spec's, so it
cannot drift from the work. Fields marked `RECORD_ONLY` (how to write the run's record, where a
message says a value came from) are left out of it.

This module imports nothing heavy: torch, transformers and peft are imported inside methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlphf_cli.errors import InputError
from rlphf_cli.models.device import bf16_is_fast, device_defaults
from rlphf_cli.preferences import Preference

RECORD_ONLY = {"fingerprint": False}
# A field added later: recorded only when it differs from its default, so what was made before it
# existed keeps its fingerprint (and its cached outputs).
NEW_FIELD = {"omit_default": True}


def record(spec: Any) -> Any:
    """A spec as plain JSON-able data, without its RECORD_ONLY fields: what its fingerprint hashes and
    what an output's record says it was made with."""
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return {f.name: record(getattr(spec, f.name)) for f in dataclasses.fields(spec)
                if f.metadata.get("fingerprint", True)
                and not (f.metadata.get("omit_default") and getattr(spec, f.name) == f.default)}
    if hasattr(spec, "model_dump"):  # a recipe section (a frozen pydantic model), e.g. a judge's settings
        return spec.model_dump(mode="json", exclude={name for name, info in type(spec).model_fields.items()
                                                     if (info.json_schema_extra or {}).get("fingerprint") is False})
    if isinstance(spec, Mapping):
        return {str(k): record(v) for k, v in spec.items()}
    if _is_items(spec):  # frozen_items of a mapping (TRL fields, ...): a mapping again
        return {k: record(v) for k, v in spec}
    if isinstance(spec, (list, tuple)):
        return [record(v) for v in spec]
    if isinstance(spec, Path):
        return str(spec)
    return spec


def _is_items(value: Any) -> bool:
    return (isinstance(value, tuple) and bool(value)
            and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value)
            and len({v[0] for v in value}) == len(value))


def fingerprint(spec: Any) -> str:
    from rlphf_cli.runs import fingerprint as hash_of

    return hash_of(record(spec))


def frozen_items(mapping: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A mapping as sorted (key, value) pairs, lists made tuples: a value a frozen spec can hold."""
    def freeze(value: Any) -> Any:
        if isinstance(value, Mapping):
            return frozen_items(value)
        if isinstance(value, list):
            return tuple(freeze(v) for v in value)
        return value

    return tuple(sorted((str(k), freeze(v)) for k, v in mapping.items()))


def thawed(items: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """frozen_items back into a dict (nested pairs become dicts, tuples lists), as TRL expects."""
    def thaw(value: Any) -> Any:
        if _is_items(value):
            return thawed(value)
        if isinstance(value, tuple):
            return [thaw(v) for v in value]
        return value

    return {k: thaw(v) for k, v in items}


# --------------------------------------------------------------------------------------------
# What a preference is, to the work that reads it


@dataclass(frozen=True)
class PromptedPreference:
    """What a model is prompted with for a preference (generation, RL prompts, SFT rows)."""

    id: str
    dimension: str
    prompt: str


@dataclass(frozen=True)
class Criterion:
    """What a judge is asked about a preference (annotation, evaluation)."""

    id: str
    alias: str
    criterion: str


# --------------------------------------------------------------------------------------------
# The model, and the one rule for its dtype and 4-bit loading


@dataclass(frozen=True)
class ModelSpec:
    name: str = "tiny"  # a built-in model, a local folder, a .gguf file or a hub name
    prompt_format: str = "chat"
    dtype: str = "auto"
    load_in_4bit: bool = False
    revision: str | None = None
    trust_remote_code: bool = False

    def path(self) -> str:
        """What from_pretrained loads: a built-in model's cached folder (built first if missing), a
        GGUF file's converted folder (converted first if missing), else the name as given (a folder
        or a hub name)."""
        from rlphf_cli.models import resolve_model

        return resolve_model(self.name)

    def dtype_name(self) -> str:
        """`dtype`, where 'auto' is bfloat16 on a GPU that has it and float32 otherwise (CPU)."""
        if self.dtype != "auto":
            return self.dtype
        import torch

        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype_name())

    def quantization_config(self):
        """The 4-bit (QLoRA) BitsAndBytesConfig when `load_in_4bit`, else None; it computes in the
        model's dtype."""
        if not self.load_in_4bit:
            return None
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise InputError("model.load_in_4bit needs bitsandbytes: pip install 'rlphf[quant]'") from None
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=self.torch_dtype())


@dataclass(frozen=True)
class LoraSpec:
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | str = "all-linear"
    bias: str = "none"

    def peft_config(self, task_type: str):
        """A peft LoraConfig. `SEQ_CLS` (reward models) also trains and saves the `score` head."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=list(self.target_modules) if isinstance(self.target_modules, tuple)
                          else self.target_modules, bias=self.bias, task_type=task_type,
                          modules_to_save=["score"] if task_type == "SEQ_CLS" else None)


# --------------------------------------------------------------------------------------------
# Trainers: one table from algorithm to TRL classes and recipe section


@dataclass(frozen=True)
class Trainer:
    section: str  # where the recipe holds its TRL config fields
    config: str  # trl config class
    trainer: str  # trl trainer class
    online: bool  # samples completions and scores them with reward models


TRAINERS: dict[str, Trainer] = {
    "reward": Trainer("train_rm.trl", "RewardConfig", "RewardTrainer", online=False),
    "rloo": Trainer("train_policy.rloo", "RLOOConfig", "RLOOTrainer", online=True),
    "grpo": Trainer("train_policy.grpo", "GRPOConfig", "GRPOTrainer", online=True),
    "dpo": Trainer("train_policy.dpo", "DPOConfig", "DPOTrainer", online=False),
    "sft": Trainer("train_policy.sft", "SFTConfig", "SFTTrainer", online=False),
}
POLICY_ALGOS = ("rloo", "grpo", "dpo")  # what --algo picks; mode multitask always trains with sft


@dataclass(frozen=True)
class TrainerSpec:
    """A TRL config: the recipe's fields for one algorithm (checked against the TRL class, numbers
    coerced), the seed, and where they came from for messages."""

    algo: str
    fields: tuple[tuple[str, Any], ...] = ()
    seed: int = 0
    origin: str = field(default="<recipe>", metadata=RECORD_ONLY)

    @property
    def trainer(self) -> Trainer:
        return TRAINERS[self.algo]

    def get(self, key: str, default: Any = None) -> Any:
        return thawed(self.fields).get(key, default)

    def config(self, model: ModelSpec, output_dir: str, defaults: Mapping[str, Any] | None = None, **fixed: Any):
        """trl.<config>: device defaults < `defaults` < the recipe's fields < `fixed` (what the stage
        must set: the output folder, ...)."""
        import trl

        from rlphf_cli.errors import RecipeError

        user = thawed(self.fields)
        kwargs: dict[str, Any] = {
            "seed": self.seed,
            "report_to": "none",
            "logging_steps": 1,  # metrics.jsonl has one line per step
            "disable_tqdm": True,  # the CLI draws its own progress
            "save_strategy": "no",
            "model_init_kwargs": {"dtype": model.dtype_name(), "revision": model.revision},
            "trust_remote_code": model.trust_remote_code,
            **device_defaults(),
            **(defaults or {}),
        }
        if "gradient_checkpointing" in user:  # the deprecated alias only counts when the new name is unset
            kwargs.pop("activation_checkpointing", None)
        if "save_steps" in user and "save_strategy" not in user:
            kwargs["save_strategy"] = "steps"
        if user.get("bf16") == "auto":
            user["bf16"] = bf16_is_fast()
        kwargs.update(user)
        kwargs.update(fixed)
        kwargs["output_dir"] = output_dir
        try:
            return getattr(trl, self.trainer.config)(**kwargs)
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"{self.origin}: {self.trainer.section}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Merging: a method with the parameters it declares


@dataclass(frozen=True)
class MergeSpec:
    """A merge method with the parameters it declares (rlphf_cli.merging.methods.merge_spec makes
    one and checks it; `merger` there makes the method)."""

    method: str = "average"
    params: tuple[tuple[str, Any], ...] = ()

    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)


@dataclass(frozen=True)
class MergeJob:
    """A soup: adapter folders and their weights merged into one adapter folder."""

    inputs: tuple[Path, ...]
    weights: tuple[float, ...]
    out: Path
    merge: MergeSpec = MergeSpec()
    labels: tuple[str, ...] = ()  # the preferences merged (the card names them), when they are the run's policies
    into_base: Path | None = None  # also a full model with the soup merged into the base weights
    base_model: str | None = None  # for into_base (default: the adapters' base_model_name_or_path)
    record: RunRecord | None = field(default=None, metadata=RECORD_ONLY)


# --------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0

    def generate_kwargs(self) -> dict:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens,
                                  "repetition_penalty": self.repetition_penalty,
                                  "no_repeat_ngram_size": self.no_repeat_ngram_size}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def to_record(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PromptSet:
    source: str  # 'builtin:NAME', a JSON/JSONL file, a dataset folder or 'hf:name[:split]'
    limit: int | None = None

    def load(self) -> list[dict]:
        from rlphf_cli.data import load_prompts

        return load_prompts(self.source, self.limit)


@dataclass(frozen=True)
class Member:
    """One adapter of what a generator decodes with: its folder, its label, its weight."""

    path: Path
    label: str
    weight: float = 1.0


@dataclass(frozen=True)
class Weights:
    """The base model alone, one adapter (one member, `merge` None), or a soup of adapters: merged
    with `merge` (compose "params"), or mixed at decoding time, sum_i w_i log p_i of the experts'
    next-token distributions (compose "logits")."""

    members: tuple[Member, ...] = ()
    merge: MergeSpec | None = None
    compose: str = field(default="params", metadata=NEW_FIELD)  # params | logits (COMPOSE)

    @property
    def adapter(self) -> Member | None:
        return self.members[0] if self.members and self.merge is None else None

    def system(self) -> str:
        from rlphf_cli.preferences import soup_name

        if self.merge is not None:
            prefix = "mix:" if self.compose == "logits" else "soup:"
            return prefix + soup_name([m.label for m in self.members], [m.weight for m in self.members])
        if self.members:
            return f"adapter:{self.members[0].label}"
        return "base"


@dataclass(frozen=True)
class GenerateJob:
    """Answers of one model (base, adapter or soup) to a prompt set, into one JSONL file."""

    model: ModelSpec
    prompts: PromptSet
    out: Path
    weights: Weights = Weights()
    prefs: tuple[PromptedPreference, ...] = ()  # whose prompts are appended to every instruction
    sampling: Sampling = Sampling()
    num_samples: int = 1
    batch_size: int = 32
    system: str = "base"  # written in every record
    record: RunRecord | None = field(default=None, metadata=RECORD_ONLY)


# --------------------------------------------------------------------------------------------
# Judges


@dataclass(frozen=True)
class JudgeSpec:
    """A judge backend with its own settings (the recipe's frozen `judge.<backend>` section) and the
    templates it renders: the text of every (preference, use) template it may be asked, read and
    checked at build time (none for a backend that renders none)."""

    backend: str
    settings: Any = None
    templates: tuple[tuple[str, str, str], ...] = ()  # (preference id, use, template text)
    max_cost: float | None = field(default=None, metadata=RECORD_ONLY)  # USD; what is paid, not what is answered

    def template(self, pref_id: str, use: str) -> str:
        for pid, u, text in self.templates:
            if pid == pref_id and u == use:
                return text
        raise InputError(f"the {self.backend} judge has no template for {pref_id} ({use})")


@dataclass(frozen=True)
class AnnotateJob:
    """Pairs of rollouts labelled for each criterion; one annotations file per preference."""

    rollouts: Path
    out_dir: Path
    criteria: tuple[Criterion, ...]
    judge: JudgeSpec
    pairs_per_prompt: int = 1
    seed: int = 0
    record: RunRecord | None = field(default=None, metadata=RECORD_ONLY)

    def inputs(self) -> list[tuple[str, Path, str]]:
        """(what, path, the command that makes it) of every input file."""
        return [("rollouts", self.rollouts, f"rlphf generate --num-samples 2 --out {self.rollouts}")]


@dataclass(frozen=True)
class JudgeCheckJob:
    """A judge run on labelled pairs (a person's pick is `chosen`): agreement, position bias, ties, cost."""

    labels: Path
    preferences: tuple[Criterion, ...]  # every criterion a row may name (by id or alias)
    judge: JudgeSpec
    cache: Path | None = None
    bootstrap_samples: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class JudgeJob:
    """System A's generations against system B's, pairwise, on each record's criteria."""

    a: tuple[Path, ...]
    b: tuple[Path, ...]
    preferences: tuple[Criterion, ...]  # every criterion a record may name (by id or alias)
    judge: JudgeSpec
    criteria: str | tuple[str, ...] = "combo"  # 'combo' (each record's own), 'all', or names
    both_orders: bool = True
    bootstrap_samples: int = 1000
    seed: int = 0
    common: bool = False
    out: Path | None = None
    record: RunRecord | None = field(default=None, metadata=RECORD_ONLY)


# --------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class RewardModelJob:
    pref_id: str  # a preference id, or 'general' (the RLHF baseline's reward model)
    alias: str
    data: Path  # annotations: prompt / chosen / rejected
    out: Path
    model: ModelSpec
    lora: LoraSpec
    trainer: TrainerSpec
    eval_fraction: float = 0.1
    seed: int = 0
    record: RunRecord | None = field(default=None, metadata=RECORD_ONLY)

    def inputs(self) -> list[tuple[str, Path, str]]:
        """(what, path, the command that makes it) of every input file or folder."""
        return [(f"annotations for {self.alias}", self.data, f"rlphf annotate --prefs {self.alias}")]


@dataclass(frozen=True)
class PolicyJob:
    """One LoRA policy. `reward_models` score online algorithms' completions; `annotations` are the
    pairs of offline ones (dpo) or the chosen answers of mode multitask (sft); `prefs` are the
    preferences whose prompts the policy's training prompts carry (morl, multitask)."""

    name: str
    mode: str  # soup | morl | rlhf | multitask
    model: ModelSpec
    lora: LoraSpec
    trainer: TrainerSpec
    out: Path
    reward_models: tuple[tuple[str, str, Path], ...] = ()  # (id, alias, folder)
    annotations: tuple[tuple[str, str, Path], ...] = ()  # (id, alias, file)
    prefs: tuple[PromptedPreference, ...] = ()
    prompts: PromptSet | None = None
    seed: int = 0
    save_steps: int | None = None
    standardize_rewards: bool = field(default=False, metadata=NEW_FIELD)  # morl: scores standardized per RM
    record: RunRecord | None = field(default=None, metadata=RECORD_ONLY)

    @property
    def algo(self) -> str:
        return self.trainer.algo

    def inputs(self) -> list[tuple[str, Path, str]]:
        """(what, path, the command that makes it) of every input file or folder."""
        return ([(f"reward model for {alias}", path, f"rlphf train-rm --prefs {alias}")
                 for _, alias, path in self.reward_models]
                + [(f"annotations for {alias}", path, f"rlphf annotate --prefs {alias}")
                   for _, alias, path in self.annotations])


# --------------------------------------------------------------------------------------------
# Serving


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of `rlphf serve` (each a --max-... option): a request beyond one is
    an OpenAI-shaped 4xx naming the limit, before any work is queued."""

    max_body_bytes: int = 2 * 2**20  # a request body (TGI's --payload-limit is 2 MB)
    max_prompt_tokens: int | None = None  # None: the model's context minus the answer's max_tokens
    max_tokens_limit: int = 2048  # the most tokens one choice may ask for (max_tokens)
    max_n: int = 8  # choices per request (also at most --max-batch)
    max_stop: int = 4  # stop sequences per request, as OpenAI
    max_stop_chars: int = 64  # characters of one stop sequence
    max_soup_members: int = 8  # policies in one soup
    max_queue: int = 64  # requests waiting for a batch slot; beyond: 429 with Retry-After
    max_requests_per_key: int = 0  # requests in flight per API key (0: no limit)
    soup_cache_bytes: int = 4 * 2**30  # --backend vllm: disk budget of merged soup folders


@dataclass(frozen=True)
class LearnSettings:
    """How a user's picks are read (the recipe's `profile` section; rlphf_cli.profiling)."""

    temperature: float = 0.3  # Bradley-Terry scale, in standardized-score units
    lapse: float = 0.2  # share of picks that are noise (a 10% flip rate is a lapse of 0.2: half land right)
    tie_width: float = 0.15  # Rao-Kupper threshold: a utility gap below it is likely a tie
    bad_weight: float = 0.5  # "both bad" counts as this much of a tie
    particles: int = 4096
    seed: int = 0
    grid: int = 3  # slider levels per dimension that questions are asked with (3: -1, 0, 1)


@dataclass(frozen=True)
class ServeSpec:
    """What `rlphf serve` serves: the base model, the policies (a preference id or a --policy name,
    and its adapter folder), the preferences soups are named by, the merge method, the sampling
    settings of the recipe (what a request does not set) and the limits of one request."""

    model: ModelSpec
    policies: tuple[tuple[str, Path], ...]
    preferences: tuple[Preference, ...]
    merge: MergeSpec = MergeSpec()
    sampling: Sampling = Sampling()
    limits: ServeLimits = ServeLimits()
    run_dir: Path | None = None  # its reward models learn users' soups (/v1/profiles)
    eval_prompts: PromptSet | None = None  # what the learning questions ask
    learn: LearnSettings = LearnSettings()


# --------------------------------------------------------------------------------------------
# The run directory's record


@dataclass(frozen=True)
class RunRecord:
    """What a command writes into the run directory before its first output (recipe.yaml, env.json,
    its event): the resolved recipe as text, not the recipe object."""

    root: Path
    recipe_yaml: str
    source: str
    seed: int = 0
    overrides: tuple[tuple[str, Any], ...] = ()
    secrets: tuple[str, ...] = ()  # names of the environment variables that hold secrets
