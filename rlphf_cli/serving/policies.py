"""What a server serves: its policies, and the soup a request names.

A request's `model` is `base`, one policy (`concise`, `P2A`, or a `--policy NAME=PATH` name), a
weighted soup (`concise=0.7,friendly=0.3`) or a combination (`P1A+P2A+P3A`): the syntax of
rlphf_cli.generation.parse_soup, shared with `rlphf generate --soup`. A soup's members are put in
catalog order (then --policy order), as `rlphf merge --prefs` does, and its weights are those the
merge method uses, so 'friendly=0.3,concise=0.7', 'concise=0.7,friendly=0.3' and
'concise=7,friendly=3' (average) are one soup, merged once. No torch here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from rlphf_cli.errors import InputError, did_you_mean
from rlphf_cli.generation import parse_soup
from rlphf_cli.merging import plan_merge
from rlphf_cli.merging.io import AdapterInput, read_adapter
from rlphf_cli.preferences import Preference, PreferenceSet, combination_name
from rlphf_cli.specs import MergeSpec, ServeSpec

BASE = "base"
SOUP = "soup"  # the `model` of a request whose soup comes from `preferences` or the user's profile


class UnknownModel(InputError):
    """A request names a policy or model the server does not have (HTTP 404 model_not_found);
    `param` is the request field that named it."""

    def __init__(self, message: str, param: str = "model"):
        super().__init__(message)
        self.param = param


class TooManyMembers(InputError):
    """A soup names more policies than the server merges (HTTP 400, naming the limit)."""


@dataclass(frozen=True)
class Policy:
    name: str  # the preference id, or the --policy NAME of a policy without a preference
    path: Path
    preference: Preference | None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.preference.alias})" if self.preference else self.name


@dataclass(frozen=True)
class Soup:
    """What one request decodes with: no member (the base model), one policy as trained, or a merge."""

    members: tuple[tuple[str, float], ...] = ()
    merged: bool = False  # False: `members` is one policy, used as is
    preferences: tuple[Preference, ...] = ()  # whose prompts are appended (members with weight > 0)
    mixed: bool = False  # the members' next-token log-probabilities mixed at decoding time, not merged

    @property
    def key(self) -> str:
        """The canonical name: 'base', 'P2A', 'P2A=0.7,P3A=0.3', 'mix:P2A=0.7,P3A=0.3'."""
        if not self.members:
            return BASE
        if not (self.merged or self.mixed):
            return self.members[0][0]
        return ("mix:" if self.mixed else "") + ",".join(f"{name}={weight!r}" for name, weight in self.members)

    def as_mix(self) -> Soup:
        """This soup composed at decoding time (compose "logits"): weight-0 members dropped, the
        others' weights normalized (rlphf_cli.generation.mix_weights); one member left is that policy."""
        from rlphf_cli.generation import mix_weights

        if not self.members:
            raise InputError("compose 'logits' mixes policies; the base model alone has nothing to mix")
        kept, used = mix_weights(self.weights)
        members = tuple((self.members[i][0], w) for i, w in zip(kept, used, strict=True))
        if len(members) == 1:
            return Soup(members, preferences=self.preferences)
        return Soup(members, preferences=self.preferences, mixed=True)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.members]

    @property
    def weights(self) -> list[float]:
        return [weight for _, weight in self.members]


@dataclass
class PolicySet:
    """The served policies (checked adapter folders), the recipe's preferences and merge method."""

    policies: dict[str, Policy]
    preferences: PreferenceSet
    merge: MergeSpec = field(default_factory=MergeSpec)
    inputs: dict[str, AdapterInput] = field(default_factory=dict)  # name -> checked adapter (no tensors)

    def __post_init__(self):
        if not self.policies:
            raise InputError("no policies to serve")
        self.inputs = {name: read_adapter(p.path) for name, p in self.policies.items()}
        self._order = {name: i for i, name in enumerate(self.policies)}

    @property
    def method(self) -> str:
        return self.merge.method

    @property
    def params(self) -> dict:
        return self.merge.kwargs()

    @classmethod
    def from_spec(cls, spec: ServeSpec) -> PolicySet:
        """The policies of a ServeSpec (rlphf_cli.jobs.serve_spec), in its order; policies that
        cannot be merged together are refused per request (each still serves alone)."""
        prefs = PreferenceSet(spec.preferences)
        known = {p.id for p in prefs}
        policies = {name: Policy(name, Path(path), prefs.get(name) if name in known else None)
                    for name, path in spec.policies}
        return cls(policies, prefs, spec.merge)

    # -- resolving a request ----------------------------------------------------------------------

    def resolve(self, spec: str | Mapping[str, float], where: str = "model", prompts: bool = True,
                max_members: int | None = None) -> Soup:
        """A `model` string or a {name: weight} mapping -> Soup, its weights those the merge method
        uses (normalized by average, ties and dare), so equal soups have one key. InputError (HTTP
        400) for bad syntax, more than `max_members` policies or weights the merge method refuses;
        UnknownModel (HTTP 404) for a name not served."""
        if isinstance(spec, str) and spec.strip().lower() == BASE:
            return Soup()
        members = parse_soup(spec, self.preferences, where=where)
        if max_members is not None and len(members) > max_members:
            raise TooManyMembers(f"{where}: a soup of {len(members)} policies; this server merges at most "
                                 f"{max_members} (--max-soup-members)")
        for name, _ in members:
            if name not in self.policies:
                raise UnknownModel(f"{where} '{spec if isinstance(spec, str) else name}': no policy '{name}'"
                                   f"{did_you_mean(name, self._names())}; served: {self.describe()}", param=where)
        members.sort(key=lambda m: self._order[m[0]])
        single = isinstance(spec, str) and not re.search(r"[=,+]", spec)
        positive = [self.policies[n].preference for n, w in members if w > 0 and self.policies[n].preference]
        if not single:
            # Weight-0 members are dropped (as `rlphf merge` drops them), so (1, 0) is the first policy's soup.
            members = [(name, weight) for name, weight in members if weight != 0]
            # The merge method's own checks (negative weights, ...) before any request is queued.
            used = plan_merge([self.inputs[n] for n, _ in members], [w for _, w in members], self.merge).used
            members = [(name, weight) for (name, _), weight in zip(members, used, strict=True)]
        return Soup(tuple(members), merged=not single, preferences=tuple(positive) if prompts else ())

    def _names(self) -> list[str]:
        names = [BASE]
        for name, policy in self.policies.items():
            names += [name] + ([policy.preference.alias] if policy.preference else [])
        return names

    def describe(self) -> str:
        return ", ".join([BASE] + [p.label for p in self.policies.values()])

    def combinations(self) -> list[str]:
        """Every uniform combination of served preference policies (one per dimension with a policy)."""
        served = PreferenceSet([p.preference for p in self.policies.values() if p.preference])
        if len(served.dimensions) < 2:
            return []
        return [combination_name(c) for c in served.combinations()]

    def model_ids(self) -> list[str]:
        return [BASE, *self.policies, *self.combinations()]

    def dimensions(self) -> list[dict]:
        """For the playground: each dimension's two poles and whether their policies are served."""
        out = []
        for name, prefs in self.preferences.dimensions.items():
            poles = [{"id": p.id, "alias": p.alias, "served": p.id in self.policies, "prompt": p.prompt}
                     for p in prefs]
            if any(pole["served"] for pole in poles):
                out.append({"dimension": name, "poles": poles})
        return out

    def others(self) -> list[str]:
        """Served policies that belong to no preference (no slider on the playground)."""
        return [name for name, p in self.policies.items() if p.preference is None]


# --------------------------------------------------------------------------------------------
# Per-user profiles: --profiles FILE


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProfilesFile(_Strict):
    """profiles.yaml: `users: {alice: {concise: 0.7, friendly: 0.3}, bob: P1B+P2B}`."""

    users: dict[str, dict[str, float] | str]
    learned: dict[str, dict] = {}  # how `rlphf profile learn` or serve learned a user's soup (rlphf_cli.learning)


def load_profiles(path: str | Path, policies: PolicySet) -> dict[str, Soup]:
    """user id -> Soup; every profile is resolved now, so a typo stops the server from starting."""
    file = Path(path).expanduser()
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{file}: cannot read profiles: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise InputError(f"{file}: invalid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    try:
        parsed = ProfilesFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("dict[", "str")))
        raise InputError(f"{file}: {loc or 'top level'}: {err['msg']}") from None
    profiles = {}
    for user, spec in parsed.users.items():
        try:
            profiles[user] = policies.resolve(spec, where=f"users.{user}")
        except InputError as exc:
            raise InputError(f"{file}: {exc}") from None
    return profiles

