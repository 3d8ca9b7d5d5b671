"""The preference catalog, aliases, combinations and a recipe's own preferences."""

from __future__ import annotations

import pytest
from helpers import write_recipe
from typer.testing import CliRunner

runner = CliRunner()


def test_aliases_and_ids_are_interchangeable():
    from rlphf_cli.preferences import PreferenceSet, combination_name

    prefs = PreferenceSet.catalog()
    assert prefs.get("concise") is prefs.get("P2A") is prefs.get("p2a")
    assert [p.id for p in prefs.resolve("elementary,P2A,friendly")] == ["P1A", "P2A", "P3A"]
    assert len(prefs.combinations()) == 8
    assert combination_name(prefs.parse_combination("elementary+concise+P3B")) == "P1A+P2A+P3B"
    assert prefs.get("P2B").prompt == (
        "Generate a response that is very informative, without missing any background information."
    )
    with pytest.raises(Exception, match="did you mean 'concise'"):
        prefs.get("consise")


def test_user_defined_preferences_join_the_catalog(tmp_path):
    from rlphf_cli.recipe import load_recipe

    path = write_recipe(tmp_path, """
preferences:
  use: [P1A, concise, formal, casual]
  define:
    - {id: P4A, alias: formal, dimension: register, prompt: Be formal., criterion: "Which is more formal?"}
    - {id: P4B, alias: casual, dimension: register, prompt: Be casual., criterion: "Which is more casual?"}
""")
    prefs = load_recipe(str(path)).preference_set()
    assert [p.id for p in prefs] == ["P1A", "P2A", "P4A", "P4B"]
    assert len(prefs.combinations()) == 2
