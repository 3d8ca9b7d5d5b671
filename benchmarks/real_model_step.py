"""Training steps on a real model, Gemma 3 270M (extra rlphf[gemma]): rlphf's settings against TRL's
defaults for the same work.

The same LoRA reward-model step (RewardTrainer on preference pairs) and the same RLOO step (TRL's
RLOOTrainer: sampling, log-probabilities over the 262k vocabulary, policy update) run twice each:
with TRL's default config (plus `use_cpu=True`, without which TRL refuses its own bf16 default on a
CPU) and with the config rlphf builds from the `gemma-270m` recipe (TrainerSpec.config: device
defaults < recipe fields). Model, data, LoRA, batch, lengths and seed are the same. Each run is its
own child process, so its peak memory (max RSS) is its own; the first step is warm-up and not
timed. Prints s/step, peak memory, the first step's loss for each, and the ratio TRL / rlphf.

    python benchmarks/real_model_step.py [--steps 2] [--threads N] [--model gemma-3-270m]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SOURCE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SOURCE_ROOT))

PAIRS = 8  # one RM step: 8 pairs (16 sequences)
RL_PROMPTS = 4  # one RLOO step: 4 prompts x 2 samples
TASKS = {"rm": "train_rm", "rloo": "train_policy"}
TOPICS = ["why the sky is blue", "how volcanoes form", "what photosynthesis is", "why we sleep",
          "how a rainbow forms", "what gravity does", "how bees make honey", "why leaves change colour"]


def step_timer():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self._start = [], [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    return Timer()


def trl_kwargs(task: str, settings: str, model_name: str, steps: int, out: str) -> dict:
    """The config fields of one run: TRL's defaults or rlphf's (recipe gemma-270m), plus the work."""
    from rlphf_cli.jobs import policy_jobs, reward_model_jobs
    from rlphf_cli.recipe import load_recipe

    recipe = load_recipe("gemma-270m", [f"model.name={model_name}"])
    job = (reward_model_jobs(recipe, "P2A") if task == "rm" else policy_jobs(recipe, "P2A"))[0]
    fields = dict(job.trainer.fields)
    work = {"max_steps": steps + 1, "seed": 0, "report_to": "none", "logging_steps": 1, "save_strategy": "no",
            "per_device_train_batch_size": PAIRS if task == "rm" else RL_PROMPTS * 2}
    if task == "rm":
        work["max_length"] = fields.get("max_length", 256)
    else:
        work.update(num_generations=2, max_completion_length=fields.get("max_completion_length", 64),
                    learning_rate=fields.get("learning_rate", 1e-6), beta=fields.get("beta", 0.0))
    if settings == "trl":
        return {**work, "use_cpu": True, "output_dir": out}
    config = job.trainer.config(job.model, out, **work)
    return {"config": config}


def run_child(task: str, settings: str, model_name: str, steps: int, threads: int | None) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from trl import RewardConfig, RewardTrainer, RLOOConfig, RLOOTrainer

    from rlphf_cli.models import resolve_model
    from rlphf_cli.prompting import render_prompt
    from rlphf_cli.training.common import conversation_text, encode, load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    transformers.utils.logging.set_verbosity_error()
    path = resolve_model(model_name)
    tokenizer = load_tokenizer(path)
    timer = step_timer()
    lora = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    with tempfile.TemporaryDirectory() as out:
        kwargs = trl_kwargs(task, settings, model_name, steps, out)
        if task == "rm":
            rows = {"chosen_ids": [], "rejected_ids": []}
            for topic in TOPICS[:PAIRS]:
                prompt = f"Explain {topic}."
                short, long = f"In short: {topic}.", f"Here is a long answer about {topic}. " * 4
                rows["chosen_ids"].append(encode(tokenizer, conversation_text(tokenizer, prompt, short, "tulu"),
                                                 "tulu", None))
                rows["rejected_ids"].append(encode(tokenizer, conversation_text(tokenizer, prompt, long, "tulu"),
                                                   "tulu", None))
            args = kwargs.get("config") or RewardConfig(**kwargs)
            trainer = RewardTrainer(model=path, args=args, train_dataset=Dataset.from_dict(rows),
                                    processing_class=tokenizer,
                                    peft_config=LoraConfig(task_type="SEQ_CLS", **lora), callbacks=[timer])
        else:
            prompts = [render_prompt(tokenizer, f"Explain {topic}.", "tulu") for topic in TOPICS[:RL_PROMPTS]]
            args = kwargs.get("config") or RLOOConfig(**kwargs)

            def shorter(completions, **_):  # the same cheap reward for both: the step's own cost is measured
                return [-len(c) / 100 for c in completions]

            trainer = RLOOTrainer(model=path, reward_funcs=shorter, args=args,
                                  train_dataset=Dataset.from_dict({"prompt": prompts * 4}),
                                  processing_class=tokenizer, peft_config=LoraConfig(task_type="CAUSAL_LM", **lora),
                                  callbacks=[timer])
        trainer.train()
    timed = timer.times[1:] or timer.times
    return {"s_per_step": sum(timed) / len(timed), "first_loss": timer.losses[0] if timer.losses else None,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "bf16": bool(args.bf16), "checkpointing": bool(getattr(args, "gradient_checkpointing", False))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tasks", default="rm,rloo")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(*args.child, args.model, args.steps, args.threads)))
        return 0
    results = {}
    for task in args.tasks.split(","):
        for settings in ("trl", "rlphf"):
            command = [sys.executable, __file__, "--child", task, settings, "--model", args.model,
                       "--steps", str(args.steps)] + (["--threads", str(args.threads)] if args.threads else [])
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            results[task, settings] = json.loads(done.stdout.strip().splitlines()[-1])
            figures = results[task, settings]
            print(f"{task:<5} {settings:<6} {figures['s_per_step']:7.2f} s/step  peak {figures['peak_rss_gb']:.2f} GB  "
                  f"first loss {figures['first_loss']}  bf16={figures['bf16']} "
                  f"checkpointing={figures['checkpointing']}", flush=True)
        ratio = results[task, "trl"]["s_per_step"] / results[task, "rlphf"]["s_per_step"]
        print(f"{task}: TRL defaults / rlphf = {ratio:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
