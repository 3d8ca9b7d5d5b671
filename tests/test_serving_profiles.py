"""Learning a user's soup over HTTP: /v1/profiles/{user}/compare, /feedback and GET, persisted in
the --profiles file, and used by chat requests with model "soup"."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from openai import OpenAI
from test_serving import call
from test_serving_browser import browser, wait_for  # noqa: F401, F811 (browser: the headless Chromium fixture)

from rlphf_cli.recipe import load_recipe

pytestmark = [pytest.mark.usefixtures("single_torch_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def learn_run(serve_run, tiny_model, tmp_path_factory):
    """serve_run's policies, plus a random reward model per served preference and a few held-out
    answers to standardize their scores on."""
    from pathlib import Path

    from lora_helpers import make_adapter

    tiny_model = Path(tiny_model)
    run = tmp_path_factory.mktemp("learn-run")
    shutil.copytree(serve_run / "policy", run / "policy")
    for seed, pref in enumerate(("P1A", "P2A", "P2B", "P3A")):
        out = make_adapter(tiny_model, run / "rm" / pref, seed=10 + seed, std=0.05, task="SEQ_CLS",
                           modules_to_save=["score"])
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (tiny_model / name).is_file():
                shutil.copy(tiny_model / name, out / name)
    answers = ["Rain is water falling from clouds.", "Hey friend! Rain is so fun, haha :)",
               "Precipitation results from condensation of atmospheric water vapour.", "Whatever. Google it."]
    (run / "rollouts.jsonl").write_text("".join(json.dumps({"instruction": "What is rain?", "response": a}) + "\n"
                                                for a in answers))
    (run / "profiles.yaml").write_text("users:\n  bob: P1A+P2A+P3A\n")
    return run


@pytest.fixture(scope="module")
def learning_server(learn_run):
    from helpers import running_server

    recipe = load_recipe(None, [], {"run_dir": str(learn_run), "generate.max_new_tokens": 16,
                                    "data.max_eval_prompts": 3})
    with running_server(recipe, profiles=learn_run / "profiles.yaml", max_batch=16) as server:
        yield server


def test_compare_feedback_and_profile_over_http(learning_server, learn_run):
    url = learning_server.url
    status, comp = call("POST", f"{url}/v1/profiles/alice/compare", {})
    assert status == 200, comp
    assert len(comp["answers"]) == 2 and comp["soups"][0] != comp["soups"][1] and comp["id"]
    status, body = call("POST", f"{url}/v1/profiles/alice/feedback", {"comparison_id": comp["id"], "pick": "1"})
    assert status == 200 and body["picks"] == 1 and set(body["point"]) == {"expertise", "informativeness", "style"}
    # a second answer to the same comparison, an unknown id, a bad pick: OpenAI-shaped 4xx
    status, err = call("POST", f"{url}/v1/profiles/alice/feedback", {"comparison_id": comp["id"], "pick": "2"})
    assert status == 409 and err["error"]["code"] == "already_answered"
    status, err = call("POST", f"{url}/v1/profiles/alice/feedback", {"comparison_id": "nope", "pick": "2"})
    assert status == 404 and err["error"]["param"] == "comparison_id"
    status, comp2 = call("POST", f"{url}/v1/profiles/alice/compare", {"prompt": "Why is the sky blue?"})
    assert status == 200 and comp2["prompt"] == "Why is the sky blue?"
    status, err = call("POST", f"{url}/v1/profiles/alice/feedback", {"comparison_id": comp2["id"], "pick": "maybe"})
    assert status == 400 and err["error"]["param"] == "pick"
    status, body = call("POST", f"{url}/v1/profiles/alice/feedback", {"comparison_id": comp2["id"], "pick": "="})
    assert status == 200 and body["picks"] == 2
    status, got = call("GET", f"{url}/v1/profiles/alice")
    assert status == 200 and got["point"] == body["point"] and got["uncertainty"] == body["uncertainty"]
    # persisted, other users kept; chat with model "soup" and this user gets the learned soup
    saved = yaml.safe_load((learn_run / "profiles.yaml").read_text())
    assert set(saved["users"]) == {"bob", "alice"} and len(saved["learned"]["alice"]["picks"]) == 2
    client = OpenAI(base_url=f"{url}/v1", api_key="x")
    reply = client.chat.completions.create(model="soup", user="alice", max_tokens=4,
                                           messages=[{"role": "user", "content": "Hi"}])
    assert reply.model_extra["rlphf"]["soup"] == got["soup"]
    status, err = call("GET", f"{url}/v1/profiles/nobody")
    assert status == 404 and err["error"]["code"] == "profile_not_found"


def test_profiles_survive_a_restart(learning_server, learn_run):
    from helpers import running_server

    status, before = call("GET", f"{learning_server.url}/v1/profiles/alice")
    recipe = load_recipe(None, [], {"run_dir": str(learn_run), "generate.max_new_tokens": 16})
    with running_server(recipe, profiles=learn_run / "profiles.yaml", max_batch=4) as again:
        status, after = call("GET", f"{again.url}/v1/profiles/alice")
        assert status == 200 and after["point"] == before["point"] and after["soup"] == before["soup"]


def test_a_run_without_reward_models_is_a_4xx(served):
    status, err = call("POST", f"{served.url}/v1/profiles/alice/compare", {})
    assert status == 400 and err["error"]["code"] == "no_reward_models" and "rlphf train-rm" in err["error"]["message"]


def test_playground_finds_my_soup(learning_server, browser):  # noqa: F811
    """The playground's "find my soup" mode in headless Chromium: two answers, clicks, the sliders
    move to the estimate, "use this soup" chats with the learned profile."""
    from selenium.webdriver.common.by import By

    driver = browser
    url = learning_server.url
    driver.get(f"{url}/")
    find = driver.find_element
    panel = find(By.ID, "find")
    find(By.ID, "find-start").click()
    assert "name" in find(By.ID, "find-status").text  # no user yet
    find(By.ID, "find-user").send_keys("carol")
    find(By.ID, "find-start").click()
    wait_for(driver, lambda d: panel.get_attribute("data-state") in ("asking", "error"), timeout=120)
    assert panel.get_attribute("data-state") == "asking", find(By.ID, "find-status").text
    assert find(By.ID, "find-a").text and find(By.ID, "find-b").text
    for button, picks in (("pick-1", "1"), ("pick-same", "2")):
        find(By.ID, button).click()
        wait_for(driver, lambda d, picks=picks: panel.get_attribute("data-picks") == picks
                 and panel.get_attribute("data-state") in ("asking", "error"), timeout=120)
        assert panel.get_attribute("data-state") == "asking", find(By.ID, "find-status").text
    status, profile = call("GET", f"{url}/v1/profiles/carol")
    assert status == 200 and profile["picks"] == 2
    for dimension, value in profile["point"].items():
        slider = find(By.ID, f"slider-{dimension}")
        assert int(slider.get_attribute("value")) == round(value * 20) * 5
    find(By.ID, "find-use").click()
    assert find(By.ID, "spec").text == "soup (user carol)"
    find(By.ID, "prompt").send_keys("What is rain?")
    find(By.ID, "send").click()
    output = find(By.ID, "output")
    wait_for(driver, lambda d: output.get_attribute("data-state") in ("done", "error"), timeout=120)
    assert output.get_attribute("data-state") == "done", find(By.ID, "status").text
    assert output.get_attribute("data-model") == "soup"
