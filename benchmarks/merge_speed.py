"""Merge speed at Llama-2-7B shapes: rlphf (adapter files only) vs peft's add_weighted_adapter.

Three synthetic LoRA adapters with Llama-2-7B shapes (hidden 4096, intermediate 11008, 32 layers,
r=16 on q,k,v,o,gate,up,down; float32 as peft saves them) are written to a temporary folder, then:

1. ours, whole model: `average` and `exact` (best of 2 runs, page cache warm), `svd --rank 16`;
2. peft on a LlamaForCausalLM with the same layer shapes but --peft-layers layers (default 2;
   memory): base load + adapter load, add_weighted_adapter 'linear' (its closest to the paper's
   average; not the same formula) and 'cat' (= our exact), per layer, and a whole-model estimate
   = 32 x per-layer merge + the 7B base load extrapolated from the measured load throughput;
3. peft 'svd' at rank 16 on one 4096 x 4096 module (q_proj; peft forms the dense update and takes
   its full SVD, minutes per layer on 2 cores) vs ours: time and Frobenius error against the
   exact update.

Prints every time and ratio. Usage: python benchmarks/merge_speed.py [--peft-layers 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HIDDEN, INTER, LAYERS, RANK, ALPHA, VOCAB = 4096, 11008, 32, 16, 32, 32000
SHAPES = {  # module -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER),
}
TARGETS = [name.split(".")[1] for name in SHAPES]
PARAMS_7B = 6.74e9


PEAK_MEMORY = """
import sys, threading, time
import torch, safetensors.torch  # imported before the baseline
from rlphf_cli.merging import merge_adapters
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
base, peak, done = anon(), [0.0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
thread = threading.Thread(target=sample)
thread.start()
merge_adapters(sys.argv[1:4], [0.4, 0.3, 0.3], "exact", sys.argv[4])
done.set()
thread.join()
print(peak[0] - base)
"""


def write_adapter(folder: Path, seed: int, layers: int = LAYERS) -> Path:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for name, (out, inp) in SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, inp, generator=gen) / inp ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, RANK, generator=gen) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
              "target_modules": TARGETS, "bias": "none", "base_model_name_or_path": "meta-llama/Llama-2-7b-hf",
              "fan_in_fan_out": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
              "inference_mode": True}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def slice_adapter(source: Path, dest: Path, layers: int) -> Path:
    """The first `layers` layers of an adapter, for the peft model with that many layers."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source / "adapter_model.safetensors"))
    keep = {k: v for k, v in tensors.items() if int(k.split(".layers.")[1].split(".")[0]) < layers}
    dest.mkdir(parents=True, exist_ok=True)
    save_file(keep, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copy(source / "adapter_config.json", dest / "adapter_config.json")
    return dest


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """Best wall time of `repeat` runs (and the last result)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def timed_cpu(fn, repeat: int = 2) -> tuple[float, float]:
    """Best wall and best CPU time (all threads of this process) of `repeat` runs. On a shared machine
    the wall time includes waiting for a core; the CPU time is what the work costs."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peft-layers", type=int, default=2, help="layers of the peft model (memory)")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()

    import torch

    from rlphf_cli.merging import merge_adapters

    warnings.filterwarnings("ignore")
    work = args.keep or Path(tempfile.mkdtemp(prefix="merge-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}, load average: "
          f"{os.getloadavg()[0]:.1f}, work dir: {work}")
    try:
        default_threads = torch.get_num_threads()
        torch.set_num_threads(1)  # generating random data is faster without contended threads
        t, dirs = timed(lambda: [write_adapter(work / f"a{i}", seed=i) for i in range(3)])
        torch.set_num_threads(default_threads)
        size = sum((d / "adapter_model.safetensors").stat().st_size for d in dirs)
        print(f"3 synthetic adapters, Llama-2-7B shapes, r={RANK}, float32: {size / 1e6:.0f} MB written in {t:.1f} s")

        # 1. ours, whole model
        ours = {}
        weights = [0.4, 0.3, 0.3]
        for method in ("average", "exact"):
            ours[method], cpu = timed_cpu(lambda m=method: merge_adapters(dirs, weights, m, work / f"soup-{m}"))
            print(f"ours  {method:8s} 32 layers: {ours[method]:6.2f} s wall, {cpu:5.2f} s CPU  "
                  f"({ours[method] / LAYERS * 1e3:6.1f} ms/layer)  target < 2 s: {'met' if ours[method] < 2 else 'NOT met'}")
        ours["svd"], cpu = timed_cpu(lambda: merge_adapters(dirs, weights, "svd", work / "soup-svd", rank=RANK),
                                     repeat=1)
        n_modules = LAYERS * len(SHAPES)
        print(f"ours  svd r={RANK}  32 layers: {ours['svd']:6.2f} s wall, {cpu:5.2f} s CPU  "
              f"({ours['svd'] / n_modules * 1e3:6.1f} ms/module)")

        # Peak memory of one merge, in a fresh process: anonymous memory (RssAnon, sampled every
        # 2 ms; the inputs' mmapped file pages are page cache, not the process's own memory). The
        # inputs are read and the output written one module at a time.
        peak = subprocess.run([sys.executable, "-c", PEAK_MEMORY, *map(str, dirs), str(work / "soup-mem")],
                              capture_output=True, text=True, check=True).stdout.strip()
        print(f"ours  exact peak memory above the imports: {float(peak):.0f} MB (inputs {size / 1e6:.0f} MB, "
              f"output {size / 1e6:.0f} MB)")

        # 2. peft on a model with the same layer shapes
        from peft import PeftModel
        from transformers import LlamaConfig, LlamaForCausalLM

        layers = args.peft_layers
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
        with torch.device("cpu"):
            base = LlamaForCausalLM(config).to(torch.bfloat16)
        base.save_pretrained(work / "base")
        base_bytes = sum(p.stat().st_size for p in (work / "base").glob("*.safetensors"))
        del base
        small = [slice_adapter(d, work / f"peft-a{i}", layers) for i, d in enumerate(dirs)]

        def load_peft():
            model = LlamaForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
            model = PeftModel.from_pretrained(model, str(small[0]), adapter_name="a0")
            for i in (1, 2):
                model.load_adapter(str(small[i]), adapter_name=f"a{i}")
            return model

        t_load, model = timed(load_peft)
        load_7b = t_load * PARAMS_7B * 2 / base_bytes
        print(f"peft  base ({layers} layers, {base_bytes / 1e9:.2f} GB bf16) + 3 adapters load: {t_load:.2f} s; "
              f"7B base (13.5 GB) estimate: {load_7b:.0f} s at the same throughput")
        names = ["a0", "a1", "a2"]
        for method, kind in (("average", "linear"), ("exact", "cat")):
            t = float("inf")
            for threads in sorted({1, default_threads}):  # peft's best of 1 thread and the default
                torch.set_num_threads(threads)
                t = min(t, timed(lambda k=kind, n=threads, m=model: m.add_weighted_adapter(
                    names, weights, f"m-{k}-{n}", combination_type=k))[0])  # a new name each time, or peft skips
            torch.set_num_threads(default_threads)
            per_layer = t / layers
            whole = per_layer * LAYERS
            print(f"peft  {kind:8s} {layers} layers: {t:6.2f} s  ({per_layer * 1e3:6.1f} ms/layer); 7B estimate "
                  f"{whole:.1f} s merge, {whole + load_7b:.0f} s with the base load")
            print(f"RATIO {method} (ours) vs peft {kind}: per layer {per_layer / (ours[method] / LAYERS):.1f}x, "
                  f"whole 7B incl. base load {(whole + load_7b) / ours[method]:.0f}x")
        model = None  # free the memory before the svd part

        # 3. svd: peft's on one q_proj module vs ours
        import torch.nn as nn
        from peft import LoraConfig, get_peft_model
        from safetensors import safe_open

        class OneModule(nn.Module):
            def __init__(self):
                super().__init__()
                self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

        key = "base_model.model.model.layers.0.self_attn.q_proj"
        factors = []
        for d in dirs:
            with safe_open(str(d / "adapter_model.safetensors"), framework="pt") as f:
                factors.append((f.get_tensor(f"{key}.lora_A.weight"), f.get_tensor(f"{key}.lora_B.weight")))
        one = get_peft_model(OneModule(), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj"]), adapter_name="a0")
        for i in (1, 2):
            one.add_adapter(f"a{i}", LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj"]))
        layer = one.base_model.model.q_proj
        for i, (a, b) in enumerate(factors):
            layer.lora_A[f"a{i}"].weight.data, layer.lora_B[f"a{i}"].weight.data = a.clone(), b.clone()
        # On a loaded machine, LAPACK's threads stall each other (measured 2.5x slower with 2 threads
        # at load 5 on 2 cores): give peft's SVD one thread then, its faster setting.
        contended = os.getloadavg()[0] > (os.cpu_count() or 1)
        torch.set_num_threads(1 if contended else default_threads)
        print(f"peft  svd on one 4096 x 4096 module (dense update + full SVD; {torch.get_num_threads()} thread(s); "
              "slow on 2 cores) ...", flush=True)
        t_peft, _ = timed(lambda: one.add_weighted_adapter(names, weights, "svd", combination_type="svd",
                                                          svd_rank=RANK))
        torch.set_num_threads(default_threads)
        scale = ALPHA / RANK
        exact = sum(w * scale * b.double() @ a.double() for w, (a, b) in zip(weights, factors, strict=True))
        peft_update = layer.lora_B["svd"].weight.double() @ layer.lora_A["svd"].weight.double()  # alpha = r
        with safe_open(str(work / "soup-svd" / "adapter_model.safetensors"), framework="pt") as f:
            our_update = f.get_tensor(f"{key}.lora_B.weight").double() @ f.get_tensor(f"{key}.lora_A.weight").double()
        optimal = float(torch.linalg.svdvals(exact)[RANK:].square().sum().sqrt())
        err_peft, err_ours = float((exact - peft_update).norm()), float((exact - our_update).norm())
        per_module = ours["svd"] / n_modules
        print(f"peft  svd r={RANK}: {t_peft:.2f} s per 4096x4096 module; 7B estimate >= {t_peft * n_modules / 60:.0f} "
              "min (the MLP modules are larger)")
        print(f"error (Frobenius, vs the exact update): optimal {optimal:.6e}, ours {err_ours:.6e}, "
              f"peft {err_peft:.6e}; (ours - peft) / peft = {(err_ours - err_peft) / err_peft:+.1e} "
              f"({'no larger' if err_ours <= err_peft * (1 + 1e-6) else 'LARGER'})")
        print(f"RATIO svd time peft/ours per module: {t_peft / per_module:.0f}x (ours averaged over all module shapes)"
              f"  target >= 20x: {'met' if t_peft / per_module >= 20 else 'NOT met'}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
