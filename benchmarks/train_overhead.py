"""The same RLOO steps through `rlphf train-policy`'s library call and through a plain TRL script.

Both runs use the same base model, prompts, LoRA settings, TRL config values and reward model
(a LoRA RM trained here first); the plain script hands TRL the RM as a PeftModel with its
tokenizer, ours goes through `train_policy` (RewardScorer callable, metrics JSONL, progress,
interrupt handling, atomic publishing). Everything after the imports is timed, including model
loading and saving the adapter. Prints the ratio ours / plain (target: <= 1.10).

    python benchmarks/train_overhead.py [--model tiny|DIR] [--steps 20] [--repeats 1] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



def make_pairs(path: Path, prompts: list[dict], seed: int = 0) -> None:
    """Synthetic concise-vs-verbose pairs: enough to give the reward model something to learn."""
    rng = random.Random(seed)
    filler = "this is because of the many reasons that people often talk about in great detail".split()
    rows = []
    for record in prompts[:96]:
        short = f"{record['instruction'].rstrip('.?!')} in brief."
        long = short + " " + " ".join(rng.choice(filler) for _ in range(rng.randint(15, 30))) + "."
        rows.append({"prompt": record["instruction"], "chosen": short, "rejected": long, "id": record["id"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def plain_trl(model_path: str, rm_dir: Path, records: list[dict], steps: int, seed: int, rloo: dict,
              out: Path) -> float:
    """What a user would write with TRL alone."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import RLOOConfig, RLOOTrainer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    rm_base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
    rm = PeftModel.from_pretrained(rm_base, str(rm_dir)).eval()
    rm_tokenizer = AutoTokenizer.from_pretrained(str(rm_dir))
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": r["instruction"]}] for r in records]})
    args = RLOOConfig(output_dir=str(out / "ckpt"), max_steps=steps, seed=seed, bf16=False,
                      activation_checkpointing=False, report_to="none", save_strategy="no",
                      model_init_kwargs={"dtype": "float32"}, **rloo)
    trainer = RLOOTrainer(model=model_path, reward_funcs=rm, reward_processing_classes=rm_tokenizer, args=args,
                          train_dataset=dataset, processing_class=tokenizer,
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    trainer.remove_callback(PrinterCallback)  # its log lines are not part of the comparison
    trainer.train()
    trainer.save_model(str(out / "plain"))
    return time.perf_counter() - start


def ours(recipe, rm_dir: Path, prompts_spec: str, out: Path) -> float:
    from rlphf_cli.jobs import policy_jobs
    from rlphf_cli.training.policy import train_policy

    start = time.perf_counter()
    job = policy_jobs(recipe, "P2A", reward_model=rm_dir, prompts=prompts_spec, out=out / "ours")[0]
    train_policy(job, progress=lambda done, total: None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (the embedded model) or a model folder")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="alternate plain/ours this many times; best of each")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    import trl  # noqa: F401  (imports are not what we measure)

    from rlphf_cli.data import load_prompts
    from rlphf_cli.jobs import reward_model_jobs
    from rlphf_cli.models import resolve_model
    from rlphf_cli.recipe import load_recipe
    from rlphf_cli.training import quiet_libraries
    from rlphf_cli.training.reward import release_shared_models, train_reward_model

    quiet_libraries()
    model_path = resolve_model(args.model)
    records = load_prompts("builtin:tiny-train")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        prompts_file = tmp / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps({"id": r["id"], "prompt": r["instruction"]}) + "\n"
                                        for r in records))
        # The tiny recipe's RLOO settings (batch, generations, lengths, lr, beta) for both runs.
        recipe = load_recipe("tiny", [f"run_dir={tmp / 'run'}", f"train_policy.rloo.max_steps={args.steps}",
                                      f"model.name={model_path}"])
        rloo = {k: v for k, v in recipe.train_policy.rloo.items() if k != "max_steps"}
        make_pairs(tmp / "P2A.jsonl", records)
        rm_dir = tmp / "rm"
        rm = train_reward_model(reward_model_jobs(recipe, "P2A", data=tmp / "P2A.jsonl", out=rm_dir)[0])
        print(f"reward model: held-out accuracy {rm['accuracy']:.0%} on synthetic pairs ({rm['train_s']:.1f} s)")

        plain_times, our_times = [], []
        for i in range(args.repeats):
            release_shared_models()
            plain_times.append(plain_trl(model_path, rm_dir, records, args.steps, recipe.seed, rloo, tmp / f"p{i}"))
            release_shared_models()
            our_times.append(ours(recipe, rm_dir, str(prompts_file), tmp / f"o{i}"))
            print(f"run {i + 1}: plain TRL {plain_times[-1]:.1f} s, rlphf train_policy {our_times[-1]:.1f} s")
    plain, mine = min(plain_times), min(our_times)
    print(f"{args.steps} RLOO steps on {args.model}: plain TRL {plain:.1f} s ({plain / args.steps:.2f} s/step), "
          f"rlphf {mine:.1f} s ({mine / args.steps:.2f} s/step)")
    print(f"overhead ratio (rlphf / plain TRL): {mine / plain:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
