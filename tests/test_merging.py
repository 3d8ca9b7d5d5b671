"""`rlphf merge` and rlphf_cli.merging: equalities against the paper's code and peft, logits, errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import one_error_line
from lora_helpers import TARGETS, make_adapter
from typer.testing import CliRunner

from rlphf_cli.cli.main import app
from rlphf_cli.errors import InputError
from rlphf_cli.merging import METHODS, merge_adapters
from rlphf_cli.runs import file_sha256

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def adapters(tiny_random_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_random_model
    made = {f"a{i}": make_adapter(base, root / f"a{i}", seed=i) for i in range(3)}
    made["r8"] = make_adapter(base, root / "r8", r=8, alpha=4, seed=7)  # another rank and alpha
    made["rs"] = make_adapter(base, root / "rs", r=2, alpha=3, seed=8, use_rslora=True)
    return made


def load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def updates(folder: Path) -> dict[str, torch.Tensor]:
    """module -> s * B A in float64, from the files, with PEFT's scaling."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load(folder)
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            b = tensors[f"{module}.lora_B.weight"]
            r = a.shape[0]
            scale = config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)
            out[module] = scale * b.double() @ a.double()
    return out


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def peft_model(base: Path, adapter_dirs: dict[str, Path]):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), str(adapter_dirs[names[0]]),
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    return model


INPUT_IDS = torch.tensor([[5, 17, 42, 99, 123, 7, 64, 200, 31, 2]])


def logits(base: Path, adapter: Path | None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model.eval()(INPUT_IDS).logits[0].double()


# --------------------------------------------------------------------------------------------
# Equalities


def test_uniform_average_is_the_papers_code_bit_for_bit(adapters, tmp_path):
    dirs = [adapters["a0"], adapters["a1"], adapters["a2"]]
    out = merge_adapters(dirs, [1, 1, 1], "average", tmp_path / "soup")
    ckpts = [load(d) for d in dirs]
    ours = load(out)
    assert set(ours) == set(ckpts[0])
    for key in ckpts[0]:
        # joeljang/RLPHF generate_rollouts.py: param_sum = params; param_sum += params; / len
        param_sum = None
        for ckpt in ckpts:
            param_sum = ckpt[key].clone() if param_sum is None else param_sum + ckpt[key]
        assert torch.equal(ours[key], param_sum / len(ckpts)), key
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads(
        (adapters["a0"] / "adapter_config.json").read_text())


def test_bfloat16_and_mixed_dtypes(adapters, tmp_path):
    """bf16 adapters: the paper's average in bf16, bit for bit; a bf16 extra tensor next to float32
    factors (the writer's fallback path) keeps its dtype."""
    from safetensors.torch import save_file

    halves, mixed = [], []
    for name in ("a0", "a1"):
        tensors = load(adapters[name])
        for kind, convert in (("bf16", lambda t: t.bfloat16()), ("mixed", lambda t: t)):
            folder = tmp_path / f"{name}-{kind}"
            shutil.copytree(adapters[name], folder)
            out = {k: convert(v) for k, v in tensors.items()}
            if kind == "mixed":
                out["base_model.model.extra.weight"] = torch.full((3, 5), float(name[-1]), dtype=torch.bfloat16)
            save_file(out, str(folder / "adapter_model.safetensors"))
            (halves if kind == "bf16" else mixed).append(folder)
    ours = load(merge_adapters(halves, None, "average", tmp_path / "soup-bf16"))
    inputs = [load(d) for d in halves]
    for key, value in ours.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, (inputs[0][key] + inputs[1][key]) / 2), key
    soup = load(merge_adapters(mixed, [0.25, 0.75], "exact", tmp_path / "soup-mixed"))
    assert soup["base_model.model.extra.weight"].dtype == torch.bfloat16
    assert torch.equal(soup["base_model.model.extra.weight"], torch.full((3, 5), 0.75, dtype=torch.bfloat16))
    assert all(v.dtype == torch.float32 for k, v in soup.items() if "lora_" in k)


def test_weighted_average_averages_a_and_b_separately(adapters, tmp_path):
    out = merge_adapters([adapters["a0"], adapters["a1"]], "3,1", "average", tmp_path / "soup")
    a0, a1, ours = load(adapters["a0"]), load(adapters["a1"]), load(out)
    for key in a0:
        assert torch.allclose(ours[key], 0.75 * a0[key] + 0.25 * a1[key], atol=1e-7), key
    card = json.loads((out / "soup.json").read_text())
    assert card["weights"] == [3, 1] and card["weights_used"] == [0.75, 0.25]


def test_peft_linear_is_not_the_paper_average(adapters, tiny_random_model, tmp_path):
    """peft's 'linear' uses sqrt(w s) on each factor and alpha = r: 2x the paper's update at (0.5, 0.5)."""
    ours = updates(merge_adapters([adapters["a0"], adapters["a1"]], None, "average", tmp_path / "soup"))
    model = peft_model(tiny_random_model, {"a0": adapters["a0"], "a1": adapters["a1"]})
    model.add_weighted_adapter(["a0", "a1"], [0.5, 0.5], "lin", combination_type="linear")
    for name, module in model.named_modules():
        if name in ours:
            theirs = module.get_delta_weight("lin").double()
            assert rel(theirs, ours[name]) > 0.5
            assert rel(theirs, 2 * ours[name]) < 1e-5


def test_exact_matches_peft_cat_and_the_weighted_sum(adapters, tiny_random_model, tmp_path):
    names, weights = ["a0", "r8", "rs"], [0.6, -0.3, 0.7]  # different r, alpha, rsLoRA; a subtraction
    out = merge_adapters([adapters[n] for n in names], weights, "exact", tmp_path / "soup")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 + 8 + 2 and config["lora_alpha"] == config["r"] and not config["use_rslora"]
    ours = updates(out)
    inputs = [updates(adapters[n]) for n in names]
    model = peft_model(tiny_random_model, {n: adapters[n] for n in names})
    model.add_weighted_adapter(names, weights, "cat", combination_type="cat")
    checked = 0
    for name, module in model.named_modules():
        if name in ours:
            expected = sum(w * u[name] for w, u in zip(weights, inputs, strict=True))
            assert rel(ours[name], expected) < 1e-6
            assert rel(ours[name], module.get_delta_weight("cat").double()) < 1e-5
            checked += 1
    assert checked == len(ours) == 2 * len(TARGETS)


@pytest.mark.parametrize("rank", [3, 5, 20])
def test_svd_error_is_the_optimal_rank_r_error(adapters, tmp_path, rank):
    names, weights = ["a0", "a1", "r8"], [0.5, 0.8, -0.4]  # R = 16 (< 32 = hidden), and > 32 for rank 20 below
    out = merge_adapters([adapters[n] for n in names], weights, "svd", tmp_path / "soup", rank=rank)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == rank == config["lora_alpha"]
    ours = updates(out)
    inputs = [updates(adapters[n]) for n in names]
    for name, approx in ours.items():
        exact = sum(w * u[name] for w, u in zip(weights, inputs, strict=True))
        singular = torch.linalg.svdvals(exact)
        optimal = float(singular[rank:].square().sum().sqrt())
        error = float((exact - approx).norm())
        if optimal < 1e-9 * float(singular.norm()):  # rank >= rank of the update: exact
            assert error < 1e-5 * float(singular.norm())
        else:
            assert abs(error - optimal) / optimal < 1e-4, (name, error, optimal)
    assert "relative_truncation_error_max" in json.loads((out / "soup.json").read_text())["stats"]


def test_ties_matches_peft_at_uniform_weights(adapters, tiny_random_model, tmp_path):
    """peft's weights multiply the disjoint mean; ours are normalized inside it: our soup at 1/n
    each is peft's at weight 1 each (peft at 1/n would return 1/n of the update)."""
    names = ["a0", "a1", "a2"]
    ours = load(merge_adapters([adapters[n] for n in names], [1 / 3] * 3, "ties", tmp_path / "soup", density=0.5))
    model = peft_model(tiny_random_model, {n: adapters[n] for n in names})
    model.add_weighted_adapter(names, [1.0] * 3, "t", combination_type="ties", density=0.5)
    for name, module in model.named_modules():
        if f"{name}.lora_A.weight" in ours:
            assert torch.allclose(ours[f"{name}.lora_A.weight"], module.lora_A["t"].weight, atol=1e-6)
            assert torch.allclose(ours[f"{name}.lora_B.weight"], module.lora_B["t"].weight, atol=1e-6)


def test_ties_is_a_weighted_disjoint_mean(adapters, tmp_path):
    """Where both inputs agree in sign, the merged entry is their weighted mean (scaling folded in)."""
    merged = load(merge_adapters([adapters["a0"], adapters["a1"]], [3, 1], "ties", tmp_path / "soup", density=1))
    a0, a1, root = load(adapters["a0"]), load(adapters["a1"]), (8 / 4) ** 0.5
    for key, value in merged.items():
        x, y = a0[key] * root, a1[key] * root
        agree = x.sign() == y.sign()
        assert torch.allclose(value[agree], (0.75 * x + 0.25 * y)[agree], atol=1e-6)
        elected = torch.where(0.75 * x + 0.25 * y >= 0, 1.0, -1.0)  # the weighted vote
        lone = ~agree & (x.sign() == elected)  # only a0 has the elected sign: a0's value alone
        assert torch.allclose(value[lone], x[lone], atol=1e-6)


def test_dare_is_seeded_and_drops_then_rescales(adapters, tmp_path):
    one = load(merge_adapters([adapters["a0"]], [1.0], "dare", tmp_path / "s1", density=0.3, seed=1))
    again = load(merge_adapters([adapters["a0"]], [1.0], "dare", tmp_path / "s2", density=0.3, seed=1))
    other = load(merge_adapters([adapters["a0"]], [1.0], "dare", tmp_path / "s3", density=0.3, seed=2))
    assert all(torch.equal(one[k], again[k]) for k in one)
    assert any(not torch.equal(one[k], other[k]) for k in one)
    source, scale = load(adapters["a0"]), (8 / 4) ** 0.5  # sqrt(s) on each factor: alpha = r in the output
    kept = total = 0
    for key, merged in one.items():
        mask = merged != 0
        kept, total = kept + int(mask.sum()), total + mask.numel()
        assert torch.allclose(merged[mask], source[key][mask] * scale / 0.3, rtol=1e-5)
    assert 0.25 < kept / total < 0.35


def test_dare_matches_peft_dare_linear_at_squared_weights(adapters, tiny_random_model, tmp_path):
    """At density 1 nothing is dropped: ours at weights w is peft's dare_linear at w^2 (peft puts
    sqrt(w) on each factor), and our soup at 0.5/0.5 is the mean of the inputs, not twice it."""
    names, weights = ["a0", "a1"], [0.7, 0.3]
    ours = load(merge_adapters([adapters[n] for n in names], weights, "dare", tmp_path / "soup", density=1))
    model = peft_model(tiny_random_model, {n: adapters[n] for n in names})
    model.add_weighted_adapter(names, [w * w for w in weights], "d", combination_type="dare_linear", density=1.0)
    for name, module in model.named_modules():
        if f"{name}.lora_A.weight" in ours:
            assert torch.allclose(ours[f"{name}.lora_A.weight"], module.lora_A["d"].weight, atol=1e-6)
            assert torch.allclose(ours[f"{name}.lora_B.weight"], module.lora_B["d"].weight, atol=1e-6)


@pytest.mark.parametrize("method", ["average", "exact", "svd", "ties", "dare"])
@pytest.mark.parametrize("n", [2, 3])
def test_identical_inputs_at_weights_summing_to_one_give_the_adapter_back(adapters, tmp_path, method, n):
    """A soup of n copies of one policy is that policy, whatever the method: the scale of a merge
    does not depend on how many preferences went in."""
    weights = [1 / n] * n if n == 2 else [0.5, 0.3, 0.2]
    out = merge_adapters([adapters["a0"]] * n, weights, method, tmp_path / "soup", rank=4, density=1.0)
    expected = updates(adapters["a0"])
    for module, update in updates(out).items():
        assert rel(update, expected[module]) < 1e-6, (method, module)


def test_ties_trims_n_identical_inputs_like_one(adapters, tmp_path):
    three = load(merge_adapters([adapters["a1"]] * 3, [0.2, 0.2, 0.6], "ties", tmp_path / "s3", density=0.4))
    one = load(merge_adapters([adapters["a1"]], [1.0], "ties", tmp_path / "s1", density=0.4))
    assert all(torch.allclose(three[k], one[k], atol=1e-7) for k in one)


@pytest.mark.parametrize("method, names, weights, params", [
    ("average", ["a0", "a1", "a2"], [1, 1, 1], {}),
    ("average", ["a0", "a1"], [0.7, 0.3], {}),
    ("exact", ["a0", "r8", "rs"], [0.5, -0.2, 0.7], {}),
    ("svd", ["a0", "r8"], [0.6, 0.4], {"rank": 3}),
    ("ties", ["a0", "a1", "a2"], [0.5, 0.3, 0.2], {"density": 0.5}),
    ("dare", ["a0", "a1"], [0.5, 0.5], {"density": 0.4, "seed": 3}),
])
def test_in_memory_soup_is_the_file_soup_tensor_for_tensor(adapters, tmp_path, method, names, weights, params):
    """`rlphf serve` merges from tensors in memory; `rlphf merge` from files: the same tensors."""
    from rlphf_cli.merging import merge_in_memory
    from rlphf_cli.merging.io import read_adapter

    dirs = [adapters[n] for n in names]
    written = merge_adapters(dirs, weights, method, tmp_path / "soup", **params)
    state, config = merge_in_memory([read_adapter(d) for d in dirs], [load(d) for d in dirs], weights, method,
                                    **params)
    on_disk = load(written)
    assert set(state) == set(on_disk)
    for key, tensor in on_disk.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    assert config == json.loads((written / "adapter_config.json").read_text())


# --------------------------------------------------------------------------------------------
# Behaviour of the merged model


def test_output_loads_with_peft_plain_config_and_card(adapters, tiny_random_model, tmp_path):
    from peft import LoraConfig

    dirs = [adapters["a0"], adapters["r8"]]
    out = merge_adapters(dirs, [0.5, 0.5], "svd", tmp_path / "soup", rank=4)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "soup.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config) <= {f.name for f in dataclasses.fields(LoraConfig)} | {"peft_version"}
    for key in ("task_type", "target_modules", "base_model_name_or_path"):
        assert config[key] == json.loads((dirs[0] / "adapter_config.json").read_text())[key]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = logits(tiny_random_model, out)
    assert not [w for w in caught if "nexpected" in str(w.message) or "issing" in str(w.message)]
    assert not torch.allclose(merged, logits(tiny_random_model, None))
    card = json.loads((out / "soup.json").read_text())
    assert card["method"] == "svd" and card["parameters"] == {"rank": 4} and card["formula"]
    assert card["inputs"][1]["sha256"]["adapter_model.safetensors"] == file_sha256(dirs[1] / "adapter_model.safetensors")
    assert card["rlphf_version"]


@pytest.mark.parametrize("method", ["average", "exact", "svd"])
def test_weight_one_reproduces_the_adapter(adapters, tiny_random_model, tmp_path, method):
    out = merge_adapters([adapters["a1"], adapters["a2"]], [1.0, 0.0], method, tmp_path / "soup", rank=4)
    assert torch.allclose(logits(tiny_random_model, out), logits(tiny_random_model, adapters["a1"]), atol=1e-5)


@pytest.mark.parametrize("method", ["average", "exact"])
def test_logits_move_monotonically_between_two_adapters(adapters, tiny_random_model, tmp_path, method):
    start, end = logits(tiny_random_model, adapters["a0"]), logits(tiny_random_model, adapters["a1"])
    direction = (end - start).flatten()
    positions = []
    for w in (0.0, 0.25, 0.5, 0.75, 1.0):
        out = merge_adapters([adapters["a0"], adapters["a1"]], [1 - w, w], method, tmp_path / f"w{w}")
        positions.append(float((logits(tiny_random_model, out) - start).flatten() @ direction / direction.square().sum()))
    assert positions[0] == pytest.approx(0, abs=1e-5) and positions[-1] == pytest.approx(1, abs=1e-5)
    assert all(b > a for a, b in zip(positions[:-1], positions[1:], strict=True)), positions


def test_generated_text_follows_the_weight(tiny_random_model, tmp_path):
    """Two adapters that each add a constant direction to every token embedding, read out by the
    LM head as one word; greedy text from the soups moves from one word to the other as w goes 0 -> 1."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_random_model)
    words = {}
    for folder, text in (("x", " volcano"), ("y", "!")):
        token = tokenizer(text, add_special_tokens=False).input_ids[-1]
        words[folder] = tokenizer.decode([token])
        model = LlamaForCausalLM.from_pretrained(tiny_random_model)
        direction = model.lm_head.weight[token].detach()
        peft = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules=["embed_tokens"],
                                                init_lora_weights=False))
        emb = peft.base_model.model.model.embed_tokens
        emb.lora_embedding_A["default"].data = torch.ones_like(emb.lora_embedding_A["default"])
        emb.lora_embedding_B["default"].data = (0.5 * direction / direction.norm())[:, None].clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.save_pretrained(tmp_path / folder)
    tokenizer.padding_side = "left"
    enc = tokenizer(["Explain photosynthesis.", "What is a volcano?", "Hey friend!"], return_tensors="pt",
                    padding=True)
    scores = []
    for w in (0.0, 0.25, 0.5, 0.75, 1.0):
        out = merge_adapters([tmp_path / "x", tmp_path / "y"], [1 - w, w], "average", tmp_path / f"w{w}")
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_random_model), str(out)).eval()
        ids = model.generate(**enc, max_new_tokens=12, do_sample=False)[:, enc.input_ids.shape[1]:]
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        scores.append(sum(t.count(words["x"]) - t.count(words["y"]) for t in texts))  # the measure of the text
    assert scores[0] > 0 > scores[-1], scores
    assert all(b <= a for a, b in zip(scores[:-1], scores[1:], strict=True)), scores


@pytest.fixture(scope="module")
def reward_adapters(tiny_random_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("rms")
    return [make_adapter(tiny_random_model, root / f"rm{i}", seed=10 + i, task="SEQ_CLS", modules_to_save=["score"])
            for i in range(2)]


def test_modules_to_save_are_averaged_and_load(reward_adapters, tiny_random_model, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForSequenceClassification

    rms = reward_adapters
    out = merge_adapters(rms, [0.25, 0.75], "exact", tmp_path / "soup")
    heads = [load(d)["base_model.model.score.weight"] for d in (*rms, out)]
    assert torch.allclose(heads[2], 0.25 * heads[0] + 0.75 * heads[1], atol=1e-7)
    model = PeftModel.from_pretrained(LlamaForSequenceClassification.from_pretrained(tiny_random_model, num_labels=1),
                                      str(out))
    assert torch.allclose(model.base_model.model.score.modules_to_save["default"].weight, heads[2])


@pytest.mark.parametrize("method", ["average", "ties", "dare"])
def test_score_heads_get_the_normalized_weights_of_the_update(reward_adapters, tmp_path, method):
    out = merge_adapters(reward_adapters, [1.0, 3.0], method, tmp_path / "soup", density=1.0)
    heads = [load(d)["base_model.model.score.weight"] for d in (*reward_adapters, out)]
    assert torch.allclose(heads[2], 0.25 * heads[0] + 0.75 * heads[1], atol=1e-7)
    assert json.loads((out / "soup.json").read_text())["weights_used"] == [0.25, 0.75]


def test_full_tensors_refuse_weights_not_summing_to_one_under_exact(reward_adapters, tmp_path):
    """exact at (1, 1) adds two updates; two score heads cannot be added without the base's head."""
    with pytest.raises(InputError, match="sum to 2"):
        merge_adapters(reward_adapters, [1.0, 1.0], "exact", tmp_path / "soup")
    assert not (tmp_path / "soup").exists()


def test_merge_into_base_writes_an_equivalent_full_model(adapters, tiny_random_model, tmp_path):
    from transformers import LlamaForCausalLM

    from rlphf_cli.merging import merge_into_base

    soup = merge_adapters([adapters["a0"], adapters["a1"]], None, "average", tmp_path / "soup")
    full = merge_into_base(soup, tmp_path / "full")
    with torch.no_grad():
        merged = LlamaForCausalLM.from_pretrained(full).eval()(INPUT_IDS).logits[0].double()
    assert torch.allclose(merged, logits(tiny_random_model, soup), atol=1e-4)


def test_importing_merging_and_checking_a_recipe_loads_no_torch():
    code = ("import sys; import rlphf_cli.merging; from rlphf_cli.recipe import load_recipe; load_recipe(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_recipe_names_an_unknown_merge_method(tmp_path):
    from rlphf_cli.errors import RecipeError
    from rlphf_cli.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("merge:\n  method: averge\n")
    with pytest.raises(RecipeError, match=r"merge\.method: unknown merge method 'averge' \(did you mean 'average'\?\)"):
        load_recipe(path)
    assert METHODS.names() == ["average", "exact", "svd", "ties", "dare"]


# --------------------------------------------------------------------------------------------
# The command


def test_cli_merges_adapter_folders(adapters, tmp_path):
    out, full = tmp_path / "soup", tmp_path / "full"
    result = runner.invoke(app, ["merge", str(adapters["a0"]), str(adapters["a1"]), str(adapters["a2"]),
                                 "--weights", "0.4,0.3,0.3", "--method", "average", "--out", str(out),
                                 "--into-base", str(full)])
    assert result.exit_code == 0, result.output
    assert "average" in result.output and str(out) in result.output.replace("\n", "")
    assert json.loads((out / "soup.json").read_text())["weights"] == [0.4, 0.3, 0.3]
    assert (full / "config.json").is_file() and list(full.glob("*.safetensors"))


def test_cli_merges_preferences_from_a_run_directory(adapters, tmp_path):
    run = tmp_path / "run"
    for pref, name in (("P2A", "a0"), ("P3A", "a1")):
        shutil.copytree(adapters[name], run / "policy" / pref)
    result = runner.invoke(app, ["merge", "--soup", "friendly=0.25,concise=0.75", "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    # Catalog order; a soup of unequal weights is named with them, beside the equal-share one.
    card = json.loads((run / "soups" / "P2A=0.75+P3A=0.25" / "soup.json").read_text())
    assert card["preferences"] == ["P2A", "P3A"] and card["weights"] == [0.75, 0.25]
    assert (run / "recipe.yaml").is_file()
    # The old spelling, and the merge-method name every command shares.
    result = runner.invoke(app, ["merge", "--prefs", "P2A,P3A", "--weights", "0.5,0.5", "--merge-method", "svd",
                                 "--rank", "4", "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "soups" / "P2A+P3A" / "soup.json").read_text())["method"] == "svd"


def test_cli_prints_the_weights_used_and_notes_same_dimension_mixes(adapters, tmp_path):
    run = tmp_path / "run"
    for pref, name in (("P1A", "a0"), ("P1B", "a1"), ("P2A", "a2")):
        shutil.copytree(adapters[name], run / "policy" / pref)
    result = runner.invoke(app, ["merge", "--soup", "elementary=0.5,expert=0.5,concise=0.5", "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    assert "normalized to sum to 1" in result.output and "0.3333" in result.output
    assert "note: P1A (elementary) and P1B (expert) are both of the expertise dimension" in result.output
    assert json.loads((run / "soups" / "P1A+P1B+P2A" / "soup.json").read_text())["weights_used"] == [1 / 3] * 3


def corrupt(tmp_path: Path, adapters, what: str) -> Path:
    bad = tmp_path / f"bad-{what}"
    shutil.copytree(adapters["a1"], bad)
    if what == "safetensors":
        data = (bad / "adapter_model.safetensors").read_bytes()
        (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    elif what == "config":
        (bad / "adapter_config.json").write_text("{not json")
    elif what == "missing":
        (bad / "adapter_model.safetensors").unlink()
    elif what == "bin":
        (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    elif what == "base":
        config = json.loads((bad / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = "someone/else"
        (bad / "adapter_config.json").write_text(json.dumps(config))
    elif what == "alpha":
        config = json.loads((bad / "adapter_config.json").read_text())
        config["lora_alpha"] = 16
        (bad / "adapter_config.json").write_text(json.dumps(config))
    elif what == "targets":
        config = json.loads((bad / "adapter_config.json").read_text())
        config["target_modules"] = ["q_proj", "v_proj"]
        (bad / "adapter_config.json").write_text(json.dumps(config))
    return bad


@pytest.fixture(scope="module")
def wide_adapter(tmp_path_factory, adapters):
    """Same base name and targets as the others, but made on a model with another hidden size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("wide")
    config = LlamaConfig(vocab_size=320, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    out = make_adapter(root / "base", root / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = json.loads((adapters["a0"] / "adapter_config.json").read_text())[
        "base_model_name_or_path"]
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


ERROR_CASES = [
    # (inputs, extra args, expected text in the one-line error)
    (["a0", "nope"], [], "adapter folder not found"),
    (["a0", "bad:missing"], [], "adapter_model.safetensors: file not found"),
    (["a0", "bad:safetensors"], [], "not a valid safetensors file"),
    (["a0", "bad:config"], [], "adapter_config.json: line 1: invalid JSON"),
    (["a0", "bad:bin"], [], "pickle weights are not read"),
    (["a0", "bad:base"], [], "different base models"),
    (["a0", "bad:targets"], [], "different target modules"),
    (["a0", "wide"], [], "incompatible shapes"),
    (["a0", "a1"], ["--weights", "0.5,0.3,0.2"], "3 weights for 2 adapters"),
    (["a0", "a1"], ["--weights", "0.5,nan"], "not finite"),
    (["a0", "a1"], ["--weights", "0.5,inf"], "not finite"),
    (["a0", "a1"], ["--weights", "0.5,x"], "'x' is not a number"),
    (["a0", "a1"], ["--weights", "1.5,-0.5"], "negative weight -0.5"),
    (["a0", "a1"], ["--weights", "1.5,-0.5", "--method", "ties", "--density", "0.5"], "negative weight"),
    (["a0", "r8"], [], "use --merge-method exact"),
    (["a0", "bad:alpha"], [], "different lora_alpha (16 vs 8)"),
    (["a0", "a1"], ["--method", "averge"], "unknown merge method 'averge' (did you mean 'average'?)"),
    (["a0", "a1"], ["--method", "ties"], "needs a density"),
    (["a0", "a1"], ["--method", "dare", "--density", "1.5"], "merge.density"),
    (["a0", "a1"], ["--rank", "4"], "--rank does not apply to --merge-method average"),
    (["a0", "r8"], ["--method", "ties", "--density", "0.5"], "needs equal ranks"),
]


@pytest.mark.parametrize(("inputs", "extra", "expected"), ERROR_CASES)
def test_cli_errors_are_one_line_exit_2_and_leave_nothing(adapters, wide_adapter, tmp_path, inputs, extra, expected):
    paths = []
    for name in inputs:
        if name.startswith("bad:"):
            paths.append(str(corrupt(tmp_path, adapters, name[4:])))
        elif name == "wide":
            paths.append(str(wide_adapter))
        else:
            paths.append(str(adapters.get(name, tmp_path / name)))
    out = tmp_path / "soup"
    result = runner.invoke(app, ["merge", *paths, "--out", str(out), *extra])
    assert result.exit_code == 2, result.output
    one_error_line(result, expected)
    assert not out.exists() and not list(tmp_path.glob(".soup.tmp-*"))


def test_force_merges_adapters_of_differently_named_bases(adapters, tmp_path):
    other = corrupt(tmp_path, adapters, "base")
    result = runner.invoke(app, ["merge", str(adapters["a0"]), str(other), "--force", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output


def test_cli_missing_policy_names_the_command(adapters, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adapters["a0"], run / "policy" / "P2A")
    result = runner.invoke(app, ["merge", "--prefs", "concise,friendly", "--run-dir", str(run), "--no-deps"])
    assert result.exit_code == 2
    # Only what friendly's policy needs: concise's is there.
    line = one_error_line(result, "4 inputs missing: rollouts (", "train-policy/P3A (", "go on with:")
    assert "P2A" not in line
    assert not (run / "soups").exists()
    result = runner.invoke(app, ["merge", "--soup", "concize", "--run-dir", str(run)])
    assert result.exit_code == 2 and "did you mean 'concise'" in result.output
    shutil.copytree(adapters["a1"], run / "policy" / "P3A")
    shutil.copytree(adapters["a2"], run / "policy" / "P1A")
    result = runner.invoke(app, ["merge", "--run-dir", str(run)])  # not every policy found: it would mix P1A/P1B...
    assert result.exit_code == 2 and "nothing to merge: give --soup" in result.output
    assert not (run / "soups").exists()


def test_output_folder_guards(adapters, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a soup folder"):
        merge_adapters([adapters["a0"], adapters["a1"]], None, "average", precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="one of the inputs"):
        merge_adapters([adapters["a0"], adapters["a1"]], None, "average", adapters["a0"])
    soup = merge_adapters([adapters["a0"], adapters["a1"]], None, "average", tmp_path / "soup")
    merge_adapters([adapters["a0"], adapters["a1"]], None, "exact", soup)  # an earlier soup is replaced
    assert json.loads((soup / "soup.json").read_text())["method"] == "exact"


# --------------------------------------------------------------------------------------------
# Weight-0 members and the weighted TIES vote


@pytest.mark.parametrize("method", ["average", "exact", "svd", "ties", "dare"])
def test_weight_zero_member_is_dropped_so_one_zero_gives_input_one_back(adapters, tmp_path, method):
    out = merge_adapters([adapters["a1"], adapters["a2"]], [1.0, 0.0], method, tmp_path / "soup", rank=4, density=1.0)
    expected = updates(adapters["a1"])
    for module, update in updates(out).items():
        assert rel(update, expected[module]) < 1e-12 if method == "average" else 1e-6, (method, module)
    card = json.loads((out / "soup.json").read_text())
    assert [i["path"] for i in card["inputs"]] == [str(adapters["a1"])]
    assert card["dropped_weight_0"] == [str(adapters["a2"])]
    if method == "average":  # one input at weight 1: the paper's (A_1)/1, the tensors themselves
        source = load(adapters["a1"])
        assert all(torch.equal(t, source[k]) for k, t in load(out).items())


def test_every_weight_zero_is_refused(adapters, tmp_path):
    with pytest.raises(InputError, match="every weight is 0"):
        merge_adapters([adapters["a1"], adapters["a2"]], [0.0, 0.0], "ties", tmp_path / "soup", density=1.0)
    assert not (tmp_path / "soup").exists()


def test_ties_elects_the_sign_of_the_weighted_sum(adapters, tmp_path):
    """Where the inputs disagree in sign, the sign of 0.9 x + 0.1 y wins and the merged entry is the
    winner's value: the 0.9 member's wherever 0.9 |x| > 0.1 |y|, including entries where y is larger
    (there the plain sum of TIES' paper would elect y's sign and keep the 10% member's value whole)."""
    merged = load(merge_adapters([adapters["a0"], adapters["a1"]], [0.9, 0.1], "ties", tmp_path / "soup", density=1))
    a0, a1, root = load(adapters["a0"]), load(adapters["a1"]), (8 / 4) ** 0.5
    overturned = 0
    for key, value in merged.items():
        x, y = a0[key] * root, a1[key] * root
        opposite = (x.sign() * y.sign()) < 0
        heavy = opposite & (0.9 * x.abs() > 0.1 * y.abs())
        assert torch.allclose(value[heavy], x[heavy], atol=1e-6), key
        light = opposite & ~heavy
        assert torch.allclose(value[light], y[light], atol=1e-6), key
        overturned += int((heavy & (y.abs() > x.abs())).sum())
    assert overturned > 0  # the case the plain sum gets wrong does occur in these inputs
