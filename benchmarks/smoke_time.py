"""Wall time of the smoke runs against the 30 s bar and against the old way of making one.

Each run is a fresh `python -m rlphf_cli run ...` process in a fresh working directory (start-up
and imports count), pinned to 2 cores. Cold: an empty $RLPHF_HOME, so the model is built first;
warm: the model already cached. Best of 3 each:

  ours:     rlphf run smoke
            rlphf run recipes/tiny.yaml --smoke
  old path: rlphf run recipes/tiny.yaml --set ... (a cut-down written by hand, the rubric judge) on
            the embedded `tiny` model: warm with it cached; cold adds the model's build time as its
            build.json recorded it, or measures a build from scratch with --cold-baseline (minutes)

Prints each time, the bar check and the ratios old / ours, and the load average (the machine is
shared: compare figures taken at the same load).

    python benchmarks/smoke_time.py [--repeats 3] [--cores 2] [--cold-baseline] [--tiny-home DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "recipes" / "tiny.yaml")
BAR_S = 30.0
# What a user wrote by hand before --smoke. The rubric needs answers long enough to differ in
# length and tone (with 8 new tokens every P2A pair of the trained model ties and train-rm stops).
CUT_DOWN = [
    "data.max_train_prompts=16", "data.max_eval_prompts=4", "generate.max_new_tokens=32",
    "train_rm.trl.max_steps=2", "train_rm.trl.per_device_train_batch_size=4",
    "train_policy.rloo.max_steps=2", "train_policy.rloo.per_device_train_batch_size=4",
    "train_policy.rloo.num_generations=2", "train_policy.rloo.max_completion_length=16",
    "judge.bootstrap_samples=100", "evaluation.sweep.weights=[0.0,0.5,1.0]",
]


def timed_run(args: list[str], home: Path) -> float:
    """One `rlphf run` in a fresh process and working directory; its wall time in seconds."""
    env = {**os.environ, "RLPHF_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="rlphf-smoke-bench-") as work:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "rlphf_cli", "run", *args], cwd=work, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"rlphf run {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def best_of(repeats: int, args: list[str], home: Path | None = None) -> float:
    """Best wall time; with `home` None each run gets an empty $RLPHF_HOME (cold)."""
    times = []
    for _ in range(repeats):
        if home is not None:
            times.append(timed_run(args, home))
            continue
        with tempfile.TemporaryDirectory(prefix="rlphf-home-") as empty:
            times.append(timed_run(args, Path(empty)))
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2, help="pin every run to this many cores (the bar's machine)")
    parser.add_argument("--cold-baseline", action="store_true",
                        help="build the tiny model from scratch for the cold old path (minutes) instead of taking "
                             "its recorded build time")
    parser.add_argument("--tiny-home", type=Path, default=Path("~/.cache/rlphf").expanduser(),
                        help="$RLPHF_HOME with the tiny model for the warm old path (built first if missing)")
    args = parser.parse_args()

    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if available and len(available) > args.cores:
        os.sched_setaffinity(0, available[:args.cores])  # the child processes inherit it
    cores = len(os.sched_getaffinity(0)) if available else os.cpu_count()
    load_at_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{cores} cores (load average {load_at_start}), best of {args.repeats}, a fresh process and working "
          "directory per run")

    ours = {}
    with tempfile.TemporaryDirectory(prefix="rlphf-home-") as warm_home:
        for label, run_args in (("rlphf run smoke", ["smoke"]),
                                ("rlphf run recipes/tiny.yaml --smoke", [TINY, "--smoke"])):
            cold = best_of(args.repeats, run_args)
            timed_run(run_args, Path(warm_home))  # caches the model
            warm = best_of(args.repeats, run_args, Path(warm_home))
            ours[label] = (cold, warm)
            verdict = "met" if max(cold, warm) <= BAR_S else "MISSED"
            print(f"{label:<38} cold {cold:6.1f} s   warm {warm:6.1f} s   bar {BAR_S:.0f} s: {verdict}")

    old_args = [TINY, *[part for assignment in CUT_DOWN for part in ("--set", assignment)]]
    if _recorded_build_seconds(args.tiny_home) is None:
        timed_run(old_args, args.tiny_home)  # builds the tiny model there first
    warm_old = best_of(args.repeats, old_args, args.tiny_home)
    if args.cold_baseline:
        with tempfile.TemporaryDirectory(prefix="rlphf-home-") as empty:
            cold_old = timed_run(old_args, Path(empty))
        cold_text = f"cold {cold_old:6.1f} s (built tiny, 1 run)"
    else:
        build = _recorded_build_seconds(args.tiny_home)
        cold_old = warm_old + build
        cold_text = f"cold {cold_old:6.1f} s (warm + the {build:.0f} s build in tiny's build.json)"
    print(f"{'old path: tiny.yaml + --set cut-down':<38} {cold_text}   warm {warm_old:6.1f} s")
    print(f"load average now: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (at start: {load_at_start})")

    for label, (cold, warm) in ours.items():
        print(f"ratio old path / {label}: cold {cold_old / cold:5.1f}x   warm {warm_old / warm:5.1f}x")


def _recorded_build_seconds(home: Path) -> float | None:
    """The tiny model's build time as its build.json in `home` recorded it; None if it is not built."""
    sys.path.insert(0, str(ROOT))
    os.environ["RLPHF_HOME"] = str(home)
    from rlphf_cli.models.tiny import is_built, read_build_info, tiny_model_dir

    return float(read_build_info(tiny_model_dir())["build_seconds"]) if is_built(tiny_model_dir()) else None


if __name__ == "__main__":
    main()
