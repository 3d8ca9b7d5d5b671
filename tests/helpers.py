"""Small builders the tests share: a judge or a job from a recipe, as the commands make them."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

from rlphf_cli.jobs import judge_spec
from rlphf_cli.judges import GENERAL_PREFERENCE, get_judge
from rlphf_cli.preferences import Preference
from rlphf_cli.recipe import Recipe, load_recipe


def recipe_with(*sets: str, path=None) -> Recipe:
    """A recipe (the built-in tiny one by default) with `--set` assignments."""
    return load_recipe(path, list(sets))


def judge_for(backend: str = "rubric", recipe: Recipe | None = None, prefs: Sequence[Preference] | None = None,
              cache_path=None):
    """A judge of `backend` set up from `recipe`'s settings for `prefs` (default: the recipe's
    preferences and the general criterion)."""
    recipe = recipe or load_recipe(None)
    prefs = list(recipe.preference_set()) + [GENERAL_PREFERENCE] if prefs is None else list(prefs)
    return get_judge(judge_spec(recipe, backend, prefs), cache_path)


def generator_for(recipe: Recipe, adapter=None, soup=None, merge: bool = True):
    """The recipe's model with an adapter (a folder or a preference's policy) or a soup
    ('concise,friendly' or [(name or folder, weight)]) merged in, as `rlphf generate` loads it."""
    from rlphf_cli import jobs
    from rlphf_cli.generation import Generator, parse_soup

    members = parse_soup(soup) if isinstance(soup, str) else soup
    return Generator.load(jobs.model_spec(recipe), jobs.weights(recipe, adapter, members),
                          sampling=jobs.sampling(recipe), batch_size=recipe.generate.batch_size, merge=merge)


def generate_to(recipe: Recipe, prompts: list[dict], out, *, prefs: str = "", num_samples: int | None = None,
                resume: bool = False, generator=None, progress=None) -> dict:
    """rlphf_cli.generation.generate_file of the base model on in-memory prompts."""
    from rlphf_cli import jobs
    from rlphf_cli.generation import generate_file
    from rlphf_cli.specs import PromptSet

    job = jobs.generate_job(recipe, out, prompts=PromptSet("<in memory>"), num_samples=jobs.sample_count(
        recipe, num_samples)[0], prefs=recipe.preference_set().resolve(prefs) if prefs else [])
    return generate_file(job, prompts=prompts, generator=generator, resume=resume, progress=progress)


RECIPE_LINE = re.compile(r"recipe \S+ \((built-in|[^)]*)\), run dir \S+\n")


def without_recipe_line(output: str) -> str:
    """A command's output after its first line, which names the recipe and the run directory."""
    return RECIPE_LINE.sub("", output, count=1) if RECIPE_LINE.match(output) else output


def one_error_line(result, *fragments: str, code: int = 2, exact: bool = False) -> str:
    """A command's failure as users must see it: exit `code`, one line holding every fragment, no
    traceback; `exact`: nothing else at all, not even an empty line before it."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    output = without_recipe_line(result.output)
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    if exact:
        assert output.count("\n") == 1, repr(result.output)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0].strip()


# Hand-made rollouts and generations for annotate and judge (rubric-distinguishable answers)

SAMPLES = [
    "Plants use sunlight to make food. It is fun!",
    "Photosynthesis converts photons into chemical energy through chlorophyll-mediated electron transport chains.",
    "Hey friend! Plants basically cook with sunshine, haha :) Awesome, right? Yay!",
    "Obviously plants make food from light. Figure it out yourself.",
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_rollouts(path: Path, prompts: int = 6, samples: int = 3) -> Path:
    records = [{"id": f"p{i}", "instruction": f"[q{i}] Explain photosynthesis, part {i}.", "preferences": [],
                "combo": "", "system": "base", "response": SAMPLES[i % 4],
                "responses": [SAMPLES[(i + k) % 4] for k in range(samples)]} for i in range(prompts)]
    records.append({"id": "dup", "instruction": "Say hi.", "preferences": [], "combo": "", "system": "base",
                    "response": "hi", "responses": ["hi", "hi"]})
    return write_jsonl(path, records)


def make_generations(path: Path, system: str, style: int, combos=("P1A+P2A+P3A", "P1B+P2B+P3B"), n: int = 4) -> Path:
    records = []
    for combo in combos:
        for i in range(n):
            text = SAMPLES[style] if style >= 0 else SAMPLES[i % 4]
            records.append({"id": f"e{i}", "instruction": f"[e{i}] Explain item {i}.", "preferences": [p for p in combo.split("+") if p],
                            "combo": combo, "system": system, "response": text, "responses": [text]})
    return write_jsonl(path, records)




# --------------------------------------------------------------------------------------------
# annotate


def mtimes(root: Path) -> dict[Path, int]:
    """Every file under `root` with its modification time: what a command must leave alone."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


# A recipe-defined preference and a judge template of its own (the coin judge renders it)
PIRATE = {"id": "P9X", "alias": "pirate", "dimension": "voice", "prompt": "Talk like a pirate.",
          "criterion": "Which response sounds more like a pirate?"}

PIRATE_TEMPLATE = ("Judge like a ship's captain. {criterion}\nQ: {instruction}\n(a) {output_a}\n(b) {output_b}\n"
                   "Answer \"Output (a)\" or \"Output (b)\".")


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return path


@contextlib.contextmanager
def running_server(recipe: Recipe, limits=None, extra: Sequence[str] = (), **options):
    """`rlphf serve` of `recipe`'s run directory in this process on a free port (decode thread on one
    torch thread): .url, .server, .backend. `limits`: a ServeLimits; `options`: build_server's."""
    from types import SimpleNamespace

    from rlphf_cli.jobs import serve_spec
    from rlphf_cli.serving.server import ServerThread, build_server
    from rlphf_cli.specs import ServeLimits

    server = build_server(serve_spec(recipe, extra, limits or ServeLimits()), threads=1, **options)
    with ServerThread(server) as url:
        yield SimpleNamespace(url=url, server=server, backend=server.backend)


def sse_lines(url: str, body: dict, headers: dict | None = None, timeout: float = 60) -> tuple[int, list[str]]:
    """POST a streamed chat completion with the standard library and return (status, every `data:`
    payload as sent), for what the openai client hides (null fields, the error event, [DONE])."""
    import http.client
    from urllib.parse import urlparse

    where = urlparse(url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=timeout)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}),
                           {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        text = response.read().decode()
    finally:
        connection.close()
    return response.status, [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def assert_prompt_ids_shared(model, prompt_format: str) -> int:
    """Generation, TRL's RL prompts and the reward model's inputs build the same prompt ids from the
    model's tokenizer, with its BOS once, first; returns the BOS id."""
    from types import SimpleNamespace

    from trl import RLOOTrainer

    from rlphf_cli.jobs import policy_jobs
    from rlphf_cli.recipe import load_recipe
    from rlphf_cli.training.common import conversation_text, encode, load_tokenizer
    from rlphf_cli.training.policy import build_prompts

    recipe = load_recipe(None, [f"model.name={model}", f"model.prompt_format={prompt_format}"])
    instruction = "Explain gravity."
    prefs = recipe.preference_set().resolve("P2A")

    generator = generator_for(recipe)
    generated = generator.prompt_ids(generator.prompt_text(instruction, prefs))

    tokenizer = load_tokenizer(str(model))
    bos = tokenizer.bos_token_id
    assert tokenizer("x")["input_ids"][0] == bos and tokenizer("x", add_special_tokens=False)["input_ids"][0] != bos
    # The RL dataset as train-policy builds it (mode morl appends preference prompts), tokenized by TRL's own code.
    columns = build_prompts(policy_jobs(recipe, mode="morl")[0], tokenizer, [{"instruction": instruction}])
    trl_self = SimpleNamespace(processing_class=tokenizer, chat_template_kwargs={}, _is_vlm=False)
    rl_ids = RLOOTrainer._tokenize_prompts(trl_self, columns["prompt"])[0][0]
    plain = build_prompts(policy_jobs(recipe, "P2A")[0], tokenizer, [{"instruction": instruction}])["prompt"]
    assert rl_ids[0] == bos and rl_ids.count(bos) == 1
    assert RLOOTrainer._tokenize_prompts(trl_self, plain)[0][0] == generator.prompt_ids(generator.prompt_text(instruction))
    assert generated[0] == bos and generated.count(bos) == 1

    # The reward model reads prompt + response: the same prompt ids come first.
    text = conversation_text(tokenizer, instruction, "Gravity pulls things.", prompt_format)
    scored = encode(tokenizer, text, prompt_format, None)
    plain = generator.prompt_ids(generator.prompt_text(instruction))
    assert scored[:len(plain)] == plain and scored.count(bos) == 1
    return bos
