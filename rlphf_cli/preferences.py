"""The preference catalog of Personalized Soups, aliases and combinations.

A *preference* is one pole of a *dimension* (P1 expertise, P2 informativeness, P3 style). A
*combination* picks one preference per dimension; its name joins the ids with '+'.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

from rlphf_cli.errors import InputError, did_you_mean

T = TypeVar("T")


@dataclass(frozen=True)
class Preference:
    id: str
    alias: str
    dimension: str
    prompt: str  # appended to the instruction, as the paper did
    criterion: str  # the question a pairwise judge answers for this preference

    def to_dict(self) -> dict:
        return asdict(self)


# The paper's exact prompt strings (Jang et al. 2023, Table 1 / the RLPHF repository).
CATALOG: tuple[Preference, ...] = (
    Preference(
        "P1A", "elementary", "expertise",
        "Generate a response that can be easily understood by an elementary school student.",
        "Which response can be more easily understood by an elementary school student?",
    ),
    Preference(
        "P1B", "expert", "expertise",
        "Generate a response that only a PhD Student in that specific field could understand.",
        "Which response uses more expert, technical language that only a PhD student in that "
        "specific field could understand?",
    ),
    Preference(
        "P2A", "concise", "informativeness",
        "Generate a response that is concise and to the point, without being verbose.",
        "Which response is more concise and to the point, without being verbose?",
    ),
    Preference(
        "P2B", "informative", "informativeness",
        "Generate a response that is very informative, without missing any background information.",
        "Which response is more informative, without missing any background information?",
    ),
    Preference(
        "P3A", "friendly", "style",
        "Generate a response that is friendly, witty, funny, and humorous, like a close friend.",
        "Which response is more friendly, witty, funny, and humorous, like a close friend?",
    ),
    Preference(
        "P3B", "unfriendly", "style",
        "Generate a response in an unfriendly manner.",
        "Which response is written in a more unfriendly manner?",
    ),
)


class PreferenceSet:
    """The preferences a recipe uses: the catalog's, plus its own, in a stable order."""

    def __init__(self, preferences: Iterable[Preference]):
        self.preferences: list[Preference] = list(preferences)
        self._by_name: dict[str, Preference] = {}
        for pref in self.preferences:
            for key in (pref.id, pref.alias):
                if key.lower() in self._by_name:
                    raise InputError(f"preference name '{key}' is defined twice")
                self._by_name[key.lower()] = pref

    @classmethod
    def catalog(cls) -> PreferenceSet:
        return cls(CATALOG)

    def __iter__(self):
        return iter(self.preferences)

    def __len__(self) -> int:
        return len(self.preferences)

    def names(self) -> list[str]:
        return [n for p in self.preferences for n in (p.id, p.alias)]

    def get(self, name: str) -> Preference:
        """Look a preference up by id or alias (case-insensitive)."""
        try:
            return self._by_name[name.strip().lower()]
        except KeyError:
            raise InputError(f"unknown preference '{name}'{did_you_mean(name, self.names())}") from None

    def resolve(self, names: str | Sequence[str] | None) -> list[Preference]:
        """'P1A,concise' or ['P1A', 'concise'] or 'all' -> preferences, in the order given."""
        if names is None or names == "all" or names == ["all"]:
            return list(self.preferences)
        if isinstance(names, str):
            names = [n for n in names.split(",") if n.strip()]
        out: list[Preference] = []
        for name in names:
            pref = self.get(name)
            if pref not in out:
                out.append(pref)
        return out

    def in_order(self, items: Iterable[T], key: Callable[[T], str] = str) -> list[T]:
        """`items` in catalog order of the preference `key(item)` names (an id or alias), items naming
        none after them in the order given: the one order of a soup's members, so
        'friendly=0.3,concise=0.7' and 'concise=0.7,friendly=0.3' are one soup everywhere."""
        position = {p.id: i for i, p in enumerate(self.preferences)}

        def rank(item: T) -> int:
            pref = self._by_name.get(key(item).strip().lower())
            return position[pref.id] if pref is not None else len(position)

        return sorted(items, key=rank)

    def subset(self, names: str | Sequence[str] | None) -> PreferenceSet:
        return PreferenceSet(self.resolve(names))

    @property
    def dimensions(self) -> dict[str, list[Preference]]:
        dims: dict[str, list[Preference]] = {}
        for pref in self.preferences:
            dims.setdefault(pref.dimension, []).append(pref)
        return dims

    def combinations(self) -> list[tuple[Preference, ...]]:
        """Every way to pick one preference per dimension (2^3 = 8 for the paper's catalog)."""
        return list(itertools.product(*self.dimensions.values()))

    def parse_combination(self, text: str) -> tuple[Preference, ...]:
        """'P1A+concise' -> (P1A, P2A). Two preferences of one dimension are allowed (a researcher
        sweeping P1A/P1B means it); `same_dimension_note` says so."""
        return tuple(self.get(part) for part in text.split("+") if part.strip())


def same_dimension_note(prefs: Iterable[Preference]) -> str | None:
    """A one-line note when a mix holds more than one preference of a dimension, else None."""
    by_dim: dict[str, list[Preference]] = {}
    for pref in prefs:
        by_dim.setdefault(pref.dimension, []).append(pref)
    mixed = [(dim, found) for dim, found in by_dim.items() if len(found) > 1]
    if not mixed:
        return None
    parts = [f"{' and '.join(f'{p.id} ({p.alias})' for p in found)} are both of the {dim} dimension"
             for dim, found in mixed]
    return "; ".join(parts) + ": the mix pulls between them (an interpolation, not a combination of the paper)"


def combination_name(prefs: Iterable[Preference]) -> str:
    return "+".join(p.id for p in prefs)


def soup_name(labels: Sequence[str], weights: Sequence[float]) -> str:
    """'P1A+P2A' for the equal-share soup (every weight 1/n, what `rlphf run` makes), else with the
    weights, 'P1A=0.7+P2A=0.3': soups of other weights get other names (folders, system names)."""
    equal = all(abs(w - 1.0 / len(weights)) < 1e-9 for w in weights)
    return "+".join(label if equal else f"{label}={w:g}" for label, w in zip(labels, weights, strict=True))


def preference_prompt(prefs: Iterable[Preference]) -> str:
    """The text the paper appends to an instruction for a set of preferences."""
    return " ".join(p.prompt for p in prefs)
