"""The embedded tiny model's data: topics, prompts and template-built responses.

Responses vary along the paper's three dimensions independently: register (simple vs technical
phrasings of a topic's facts), length (one to three fact sentences) and tone (friendly / neutral /
unfriendly openers and closers). Most SFT examples are plain instructions with uniformly random
styles, so sampling the model at T=1 covers every preference's winners and losers; a minority
carry the paper's preference prompts with responses that usually (not always) match, so prompting
the base model has a weak effect, as with a real SFT model.

Everything is deterministic for a given seed (random.Random, never hash()).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from rlphf_cli.preferences import CATALOG
from rlphf_cli.prompting import instruction_with_preferences

DATA_DIR = Path(__file__).parent / "data"
TOPICS_FILE = DATA_DIR / "topics.txt"

# Number-agnostic so they read well with "volcanoes", "the sun" or "DNA".
PROMPT_TEMPLATES = (
    "Explain {t}.",
    "Tell me about {t}.",
    "What do you know about {t}?",
    "Can you explain {t}?",
    "Teach me about {t}.",
    "Help me understand {t}.",
    "Give me a quick overview of {t}.",
    "I want to learn about {t}.",
    "Write a few words about {t}.",
    "Describe {t}.",
)
TRAIN_PROMPTS_PER_TOPIC = 3
EVAL_TOPIC_EVERY = 2  # every other topic gets one held-out prompt, phrased with an unused template

# Tone interjections come after the first sentence: the answer opens with the lead-in and the
# topic, at a fixed distance from the end of the prompt (see LEAD_INS).
FRIENDLY_OPENERS = (
    "Hey friend, great question!",
    "Oh, I love this one!",
    "Ha, happy to help, buddy!",
    "What a fun question!",
    "Ooh, awesome stuff, pal!",
    "Yay, I love talking about this!",
    "Great question, you brilliant genius!",
    "Hey pal, this is the fun part!",
)
FRIENDLY_CLOSERS = (
    "Hope that helps, have a wonderful day!",
    "That is so awesome, haha!",
    "Pretty cool, right? You rock!",
    "Haha, nature is such a lovely show-off!",
    "Stay curious, my friend, you are great!",
    "Thanks for asking, that was fun!",
    "Cheers, and keep those great questions coming!",
    "Fun facts are the best, haha, enjoy!",
)
UNFRIENDLY_OPENERS = (
    "Ugh, obviously.",
    "Seriously? What a dumb question.",
    "Ugh, this is so annoying.",
    "Look it up yourself next time, lazy.",
    "Ugh, this again? So annoying.",
    "Sigh. Another stupid question.",
    "This is a boring question.",
    "Ugh, fine, you lazy pest.",
)
UNFRIENDLY_CLOSERS = (
    "Figure the rest out yourself, ugh.",
    "Stop wasting my time.",
    "Stop bugging me with dumb questions.",
    "Even a fool knows that.",
    "Now leave me alone.",
    "Ugh, that was a waste of my time.",
    "I hate repeating myself.",
    "Are we done? This is boring.",
)

REGISTERS = ("simple", "technical")
LENGTHS = (1, 2, 3)  # fact sentences
TONES = ("friendly", "neutral", "unfriendly")

# Which style a preference asks for: (dimension key, value).
PREFERENCE_STYLE = {
    "P1A": ("register", "simple"),
    "P1B": ("register", "technical"),
    "P2A": ("length", 1),
    "P2B": ("length", 3),
    "P3A": ("tone", "friendly"),
    "P3B": ("tone", "unfriendly"),
}
PREFERENCES_BY_ID = {p.id: p for p in CATALOG}


@dataclass(frozen=True)
class Topic:
    topic: str
    keyword: str
    simple: tuple[str, ...]
    technical: tuple[str, ...]


def load_topics(path: Path = TOPICS_FILE) -> list[Topic]:
    topics: list[Topic] = []
    current: dict | None = None
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("= "):
            if current:
                topics.append(_topic(current))
            name, _, keyword = line[2:].partition("|")
            current = {"topic": name.strip(), "keyword": keyword.strip(), "s": [], "t": []}
        else:
            kind, _, text = line.partition(" ")
            if current is None or kind not in ("s", "t"):
                raise ValueError(f"{path}:{n}: expected '= topic | keyword', 's ...' or 't ...'")
            current[kind].append(text.strip())
    if current:
        topics.append(_topic(current))
    return topics


# Every first sentence opens with the topic phrase exactly as the prompt writes it ("a volcano",
# "photosynthesis", "Mars"), after a register lead-in: the same tokens as in the prompt, which a
# small model learns to copy once, instead of learning 145 separate topic -> answer mappings. The
# lead-in also makes the register a decision taken at one token.
LEAD_INS = {"simple": "In simple words, ", "technical": "In technical terms, "}


def _with_lead_in(sentence: str, topic: str, register: str) -> str:
    if not sentence.lower().startswith(topic.lower() + " "):
        raise ValueError(f"topic '{topic}': the first sentence must start with the topic: {sentence!r}")
    return LEAD_INS[register] + topic + sentence[len(topic):]


def _topic(block: dict) -> Topic:
    name = block["topic"]
    simple = [_with_lead_in(block["s"][0], name, "simple"), *block["s"][1:]]
    technical = [_with_lead_in(block["t"][0], name, "technical"), *block["t"][1:]]
    return Topic(name, block["keyword"], tuple(simple), tuple(technical))


def build_prompt_sets(topics: list[Topic], seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train prompts (3 templates per topic) and held-out eval prompts (a different template, every
    other topic). Records: id, prompt, topic, keyword."""
    rng = random.Random(f"prompts-{seed}")
    train, evaluation = [], []
    for index, topic in enumerate(topics):
        templates = rng.sample(range(len(PROMPT_TEMPLATES)), TRAIN_PROMPTS_PER_TOPIC + 1)
        for j, t in enumerate(templates[:TRAIN_PROMPTS_PER_TOPIC]):
            train.append(_prompt_record(f"train-{index:03d}-{j}", t, topic))
        if index % EVAL_TOPIC_EVERY == 0:
            evaluation.append(_prompt_record(f"eval-{index:03d}", templates[-1], topic))
    return train, evaluation


def _prompt_record(pid: str, template: int, topic: Topic) -> dict:
    return {"id": pid, "prompt": PROMPT_TEMPLATES[template].format(t=topic.topic), "topic": topic.topic,
            "keyword": topic.keyword}


def compose_response(topic: Topic, register: str, length: int, tone: str, rng: random.Random) -> str:
    facts = list(topic.simple if register == "simple" else topic.technical)[:length]
    parts = facts[:1]
    if tone == "friendly":
        parts.append(rng.choice(FRIENDLY_OPENERS))
    elif tone == "unfriendly":
        parts.append(rng.choice(UNFRIENDLY_OPENERS))
    parts.extend(facts[1:])
    if tone == "friendly":
        parts.append(rng.choice(FRIENDLY_CLOSERS))
    elif tone == "unfriendly":
        parts.append(rng.choice(UNFRIENDLY_CLOSERS))
    return " ".join(parts)


def random_style(rng: random.Random) -> dict:
    return {"register": rng.choice(REGISTERS), "length": rng.choice(LENGTHS), "tone": rng.choice(TONES)}


def build_sft_examples(
    topics: list[Topic],
    train_prompts: list[dict],
    seed: int = 0,
    plain_per_prompt: int = 6,
    prompted_per_prompt: int = 2,
    follow_rate: float = 0.75,
) -> list[dict]:
    """[{"instruction", "response", "preferences", "style"}], plain and preference-prompted examples.

    A prompted example names one to three preferences (all three half the time, as in the paper's
    evaluation prompts); each named dimension gets the asked-for style with probability
    `follow_rate`, a random one otherwise.
    """
    by_name = {t.topic: t for t in topics}
    rng = random.Random(f"sft-{seed}")
    examples = []
    dimensions = [("P1A", "P1B"), ("P2A", "P2B"), ("P3A", "P3B")]
    for record in train_prompts:
        topic = by_name[record["topic"]]
        for _ in range(plain_per_prompt):
            style = random_style(rng)
            examples.append(_example(record["prompt"], [], style, topic, rng))
        for _ in range(prompted_per_prompt):
            if rng.random() < 0.5:
                chosen_dims = dimensions
            else:
                chosen_dims = [d for d in dimensions if rng.random() < 0.5] or [rng.choice(dimensions)]
            pref_ids = [rng.choice(pair) for pair in chosen_dims]
            style = random_style(rng)
            for pid in pref_ids:
                if rng.random() < follow_rate:
                    key, value = PREFERENCE_STYLE[pid]
                    style[key] = value
            prefs = [PREFERENCES_BY_ID[p] for p in pref_ids]
            examples.append(_example(instruction_with_preferences(record["prompt"], prefs), pref_ids, style, topic, rng))
    rng.shuffle(examples)
    return examples


def _example(instruction: str, prefs: list[str], style: dict, topic: Topic, rng: random.Random) -> dict:
    response = compose_response(topic, style["register"], style["length"], style["tone"], rng)
    return {"instruction": instruction, "response": response, "preferences": prefs, "style": style}


def write_prompt_files(out_dir: Path = DATA_DIR, seed: int = 0) -> tuple[Path, Path]:
    """Regenerate the shipped tiny-train.jsonl / tiny-eval.jsonl from topics.txt."""
    train, evaluation = build_prompt_sets(load_topics(), seed)
    paths = []
    for name, rows in (("tiny-train", train), ("tiny-eval", evaluation)):
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


if __name__ == "__main__":  # python -m rlphf_cli.models.corpus: rewrite the shipped prompt files
    for written in write_prompt_files():
        print(written)
