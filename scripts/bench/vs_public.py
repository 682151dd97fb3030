"""Whole runs side by side: the authors' public trainers and diffrl's, same model, prompts, reward and settings.

    python scripts/bench/vs_public.py [--flow-grpo PATH] [--awm PATH] [--seeds 0 1 2] [--epochs 30]
                                      [--out docs/vs_public]

PATH is a checkout of the public repository (yifan123/flow_grpo; scxue/advantage_weighted_matching). Each pair
trains the shipped ``assets/sd3-shapes`` model (a ``StableDiffusion3Pipeline`` folder) against JPEG
compressibility (flow_grpo's ``jpeg_compressibility``: -(JPEG kB) / 500; diffrl's reward of the same name and
form) with the settings of :data:`SETTINGS` (and :data:`AWM_SETTINGS`), the seeds given, one run after the other
on this machine (the Flow-GRPO pair adds a third arm: diffrl on the public run's own prompt draws), and writes
``<out>/<pair>.json`` and ``<out>/<pair>.png``: the evaluation reward against rollouts and against training
seconds, and the median seconds per rollout of each side. Paths not given are skipped with a note.

The public code runs unchanged, from its own folder, in this project's ``.venv`` (newer torch / diffusers /
transformers than its pins) with these additions, each outside its files (docs/vs_public.md lists them):
``ml_collections`` (its config system) installed into ``<work>/<pair>/site``; ``wandb`` replaced by a
module of the same name that writes every logged number (and the prompts of logged images) to a JSONL file
and stops the run after the last epoch's rollout is logged (flow_grpo's loop is ``while True``); its config
given as a Python file in the scratch folder, built on its own ``config/base.py`` / ``config/dgx_awm.py``;
AWM's two processes started by ``torch.distributed.run`` with ``ACCELERATE_USE_CPU`` (what
``accelerate launch --cpu`` sets). A finished run of the same config is read again, not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "assets/sd3-shapes"

# One set of settings for both sides of every pair (the public names on the left of each comment).
SETTINGS = {
    "resolution": 32,           # config.resolution
    "num_steps": 10,            # sample.num_steps (rollout SDE steps)
    "eval_num_steps": 10,       # sample.eval_num_steps (ODE)
    "noise_level": 0.7,         # sample.noise_level
    "group_size": 8,            # sample.num_image_per_prompt
    "sample_batch": 8,          # sample.train_batch_size: one prompt's group per sampling batch
    "batches_per_epoch": 2,     # sample.num_batches_per_epoch: 2 prompts per rollout
    "lr": 3e-3,                 # train.learning_rate
    "clip_range": 0.2,          # train.clip_range
    "adv_clip_max": 5,          # train.adv_clip_max (an int in the public config)
    "beta": 0.0,                # train.beta (the compressibility config's 0)
    "lora_rank": 32, "lora_alpha": 64,   # fixed in train_sd3.py (gaussian init)
    "max_sequence_length": 128,  # fixed in train_sd3.py
    "eval_every": 10,           # config.eval_freq (epochs)
    "eval_prompts": 16,
}

# The AWM pair: AWM's public OCR settings (config/dgx_awm.py, ocr_sd3_no_cfg_1node) at this size. Two
# processes on both sides: the public script reaches the model through DDP's ``.module`` (it exists only when
# Accelerate wraps the model, i.e. with two or more processes).
AWM_SETTINGS = {
    "processes": 2,
    "num_steps": 10, "eval_num_steps": 10,
    "noise_level": 0.4,          # SA-Solver's tau on t in [0.3, 0.9] (the public OCR run)
    "sample_batch": 8,           # per process: 16 samples, 2 prompts x 8, per rollout
    "train_batch": 4,            # per process per training forward (x train_timesteps)
    "train_timesteps": 4,
    "lr": 3e-3, "beta": 3e-3, "ema_beta": 1, "weight_ema_decay": 0.99,   # ema_beta: an int there
    "eval_every": 10,
}

WANDB_SHIM = '''"""Stands in for wandb in the public trainers: numbers go to $VS_PUBLIC_LOG; the run stops after epoch
$VS_PUBLIC_EPOCHS's rollout is logged."""
import json, os, time

def init(*args, **kwargs):
    return None

class Image:
    def __init__(self, *args, caption=None, **kwargs):
        self.caption = caption

def log(data, step=None, **kwargs):
    row = {"time": time.time(), "step": step}
    for key, value in data.items():
        if isinstance(value, list) and value and isinstance(value[0], Image):
            row[key] = [image.caption for image in value]   # the prompts of the logged images
            continue
        try:
            row[key] = float(value)
        except (TypeError, ValueError):
            pass
    with open(os.environ["VS_PUBLIC_LOG"], "a") as handle:
        handle.write(json.dumps(row) + "\\n")
    if row.get("epoch", -1) >= int(os.environ["VS_PUBLIC_EPOCHS"]) and any(k.startswith("reward_") for k in row):
        raise SystemExit(0)
'''


# Replays train_sd3.py's prompt draws with its own sampler and DataLoader, prepared by Accelerate and driven as
# its loop drives them (set_epoch, then next): the DataLoader fetches ahead of set_epoch, so the first draws
# repeat epoch 0's prompt. Its sampler is seeded 42 whatever config.seed is: every public seed draws this list.
REPLAY = '''import importlib.util, json, sys
from torch.utils.data import DataLoader
from accelerate import Accelerator
repo, dataset, batch, k, batches, epochs = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
spec = importlib.util.spec_from_file_location("train_sd3", repo + "/scripts/train_sd3.py")
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
data = module.TextPromptDataset(dataset, "train")
sampler = module.DistributedKRepeatSampler(dataset=data, batch_size=batch, k=k, num_replicas=1, rank=0, seed=42)
loader = Accelerator().prepare(DataLoader(data, batch_sampler=sampler, num_workers=1,
                                          collate_fn=module.TextPromptDataset.collate_fn))
draws, it = [], iter(loader)
for epoch in range(epochs):
    for i in range(batches):
        sampler.set_epoch(epoch * batches + i)
        prompts, _ = next(it)
        draws += sorted(set(prompts))
print(json.dumps(draws))
'''


def replay_public_prompts(repo: Path, dataset: Path, site: Path, shim: Path, epochs: int) -> list[str]:
    """The prompts flow_grpo's train_sd3.py draws in ``epochs`` rollouts, in order (one per sampling batch)."""
    s = SETTINGS
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(site), str(repo)])}
    done = subprocess.run([sys.executable, "-c", REPLAY, str(repo), str(dataset), str(s["sample_batch"]),
                           str(s["group_size"]), str(s["batches_per_epoch"]), str(epochs)],
                          cwd=str(repo), env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: replaying flow_grpo's prompt draws failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def drawn_in_order(draws: list[str], seed: int, path: Path) -> Path:
    """A prompt file that diffrl's uniform draws read in the order of ``draws``: line ``order[k]`` holds draw k,
    where ``order`` is the first pass of diffrl's own sampler over ``len(draws)`` lines with this seed."""
    from diffrl.curriculum import UniformSampler

    perm = UniformSampler(len(draws), len(draws), seed=seed).next_indices()
    lines = [""] * len(draws)
    for k, line in enumerate(perm):
        lines[line] = draws[k]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_prompts(folder: Path, train_prompts: list[str], eval_prompts: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").write_text("\n".join(train_prompts) + "\n")
    (folder / "test.txt").write_text("\n".join(eval_prompts) + "\n")


def public_site(out: Path) -> Path:
    """ml_collections (the public code's config system) in a folder of its own, installed once."""
    site = out / "site"
    if not (site / "ml_collections").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                        "ml_collections"], check=True)
    return site


def public_config(module: str, path: Path, make: str, values: dict) -> str:
    """A config file for a public trainer: ``make()`` of the config file ``path`` (loaded as ``module``), then
    ``values`` (dotted keys, Python literals of the types the public config declares) set on it."""
    lines = "".join(f"    config.{key} = {value!r}\n" for key, value in values.items())
    return (f"import importlib.util\nspec = importlib.util.spec_from_file_location({module!r}, {str(path)!r})\n"
            f"{module} = importlib.util.module_from_spec(spec); spec.loader.exec_module({module})\n\n"
            f"def get_config():\n    config = {module}.{make}()\n{lines}    return config\n")


def common_values(dataset: Path, seed: int, scratch: Path, eval_every: int) -> dict:
    """The settings both public trainers take under the same names."""
    return {"seed": seed, "logdir": str(scratch / "logs"), "save_dir": str(scratch / "save"), "save_freq": 10 ** 9,
            "eval_freq": eval_every, "mixed_precision": "no", "allow_tf32": False, "pretrained.model": str(MODEL),
            "dataset": str(dataset), "resolution": SETTINGS["resolution"],
            "sample.num_image_per_prompt": SETTINGS["group_size"], "sample.guidance_scale": 1.0,
            "reward_fn": {"jpeg_compressibility": 1.0}, "prompt_fn": "general_ocr", "per_prompt_stat_tracking": True}


def flow_grpo_config(repo: Path, dataset: Path, seed: int, scratch: Path) -> str:
    s = SETTINGS
    return public_config("base", repo / "config/base.py", "get_config", {
        **common_values(dataset, seed, scratch, s["eval_every"]),
        "sample.num_steps": s["num_steps"], "sample.eval_num_steps": s["eval_num_steps"],
        "sample.noise_level": s["noise_level"], "sample.train_batch_size": s["sample_batch"],
        "sample.num_batches_per_epoch": s["batches_per_epoch"], "sample.test_batch_size": s["sample_batch"],
        "sample.global_std": True, "train.batch_size": s["sample_batch"], "train.gradient_accumulation_steps": 1,
        "train.learning_rate": s["lr"], "train.cfg": False, "train.clip_range": s["clip_range"],
        "train.adv_clip_max": s["adv_clip_max"], "train.beta": s["beta"], "train.timestep_fraction": 1.0,
        "train.ema": False})


def diffrl_config(trainer: str, dataset: Path, seed: int, scratch: Path, epochs: int, *, lr: float, eval_every: int,
                  sampling: dict, **rest) -> dict:
    """diffrl's config for one side of a pair: the shared model, prompts, reward, LoRA and size, plus
    ``sampling`` and the trainer's own keys (``rest``)."""
    s = SETTINGS
    return {
        "trainer": trainer, "model": {"path": str(MODEL)}, "output_dir": str(scratch / "run"), "seed": seed,
        "max_steps": epochs, "lora": {"rank": s["lora_rank"], "alpha": s["lora_alpha"], "init": "gaussian"},
        "optim": {"lr": lr, "weight_decay": 1e-4, "max_grad_norm": 1.0},
        "data": {"path": str(dataset / "train.txt"), "eval_path": str(dataset / "test.txt"),
                 "eval_size": s["eval_prompts"]},
        "reward": {"weights": {"jpeg_compressibility": 1.0}},
        "sampling": {"height": s["resolution"], "width": s["resolution"], "guidance_scale": 1.0,
                     "max_sequence_length": s["max_sequence_length"], **sampling},
        "group_size": s["group_size"], **rest, "eval_every": eval_every,
        "logging": {"trackers": [], "progress_bar": False}, "checkpoint": {"every": 10 ** 6},
    }


def diffrl_flow_grpo_config(dataset: Path, seed: int, scratch: Path, epochs: int) -> dict:
    s = SETTINGS
    return diffrl_config(
        "flow_grpo", dataset, seed, scratch, epochs, lr=s["lr"], eval_every=s["eval_every"],
        sampling={"num_steps": s["num_steps"], "eval_num_steps": s["eval_num_steps"],
                  "noise_level": s["noise_level"]},
        prompts_per_step=s["batches_per_epoch"], sample_batch_size=s["sample_batch"],
        train_batch_size=s["sample_batch"], updates_per_rollout=s["batches_per_epoch"], timestep_fraction=1.0,
        train_cfg=False, clip_range=s["clip_range"], adv_clip_max=s["adv_clip_max"], beta=s["beta"])


def run_public(repo: Path, script: str, config_text: str, scratch: Path, site: Path, epochs: int,
               processes: int = 1) -> list[dict]:
    """Run the public trainer to ``epochs`` rollouts (on ``processes`` CPU processes, torchrun); returns its
    logged rows. A finished run of the same config in ``scratch`` is read, not run again."""
    log = scratch / "log.jsonl"
    done_marker = scratch / "finished"
    if not (done_marker.is_file() and (scratch / "vs_config.py").read_text() == config_text and
            (scratch / "shim" / "wandb.py").read_text() == WANDB_SHIM):
        _train_public(repo, script, config_text, scratch, site, epochs, processes)
        done_marker.write_text("")
    return [json.loads(line) for line in log.read_text().splitlines()]


def _train_public(repo: Path, script: str, config_text: str, scratch: Path, site: Path, epochs: int,
                  processes: int) -> None:
    log = scratch / "log.jsonl"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    (scratch / "shim").mkdir(exist_ok=True)
    (scratch / "shim" / "wandb.py").write_text(WANDB_SHIM)
    (scratch / "vs_config.py").write_text(config_text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(scratch / "shim"), str(site), str(repo)]),
           "VS_PUBLIC_LOG": str(log), "VS_PUBLIC_EPOCHS": str(epochs), "TOKENIZERS_PARALLELISM": "false",
           # what `accelerate launch --cpu` sets: Accelerator() then makes a gloo DDP run of the processes
           **({"ACCELERATE_USE_CPU": "true"} if processes > 1 else {})}
    with open(scratch / "stdout.txt", "w") as out:
        launcher = [sys.executable] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        done = subprocess.run([*launcher, str(repo / script), f"--config={scratch / 'vs_config.py'}"],
                              cwd=str(repo), env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = (scratch / "stdout.txt").read_text().strip().splitlines()[-3:]
        raise SystemExit(f"error: {script} stopped (exit {done.returncode}): {' | '.join(tail)}; "
                         f"whole output in {scratch / 'stdout.txt'}")


def public_curve(rows: list[dict]) -> dict:
    """Evaluation reward by epoch and by training seconds (evaluation time left out), seconds per rollout."""
    epoch_rows = [r for r in rows if "epoch" in r and any(k.startswith("reward_") for k in r)]
    eval_rows = [r for r in rows if "eval_reward_avg" in r]
    start = rows[0]["time"]   # the first evaluation's end: the first rollout starts there
    eval_seconds, previous, spent = [], None, 0.0
    for r in rows:   # an evaluation's duration: from the log before it to its own
        if "eval_reward_avg" in r and previous is not None:
            spent += r["time"] - previous
        previous = r["time"]
        if "eval_reward_avg" in r:
            eval_seconds.append(spent)
    intervals = []
    for a, b in zip(epoch_rows, epoch_rows[1:]):
        if not any(a["time"] < e["time"] < b["time"] for e in eval_rows):
            intervals.append(b["time"] - a["time"])
    evals = []
    for i, e in enumerate(eval_rows):
        epoch = int(round(e["step"] / SETTINGS["batches_per_epoch"])) if e["step"] is not None else i
        evals.append({"epoch": epoch, "reward": e["eval_reward_avg"],
                      "seconds": max(0.0, e["time"] - start - eval_seconds[i]) if epoch else 0.0})
    return {"evals": evals, "train_reward": [r["reward_avg"] for r in epoch_rows],
            "seconds_per_rollout": statistics.median(intervals) if intervals else None}


def run_diffrl(config: dict, scratch: Path, processes: int = 1) -> dict:
    import yaml

    from diffrl.report import read_metrics
    from diffrl.training.engine import FINISHED_MARKER

    path, text = scratch / "config.yaml", yaml.safe_dump(config, sort_keys=False)
    finished = Path(config["output_dir"]) / FINISHED_MARKER
    if not (finished.is_file() and path.is_file() and path.read_text() == text):   # else read the finished run
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        path.write_text(text)
        _train_diffrl(path, scratch, processes)
    return diffrl_curve(read_metrics(config["output_dir"]))


def _train_diffrl(path: Path, scratch: Path, processes: int) -> None:
    with open(scratch / "stdout.txt", "w") as out:
        done = subprocess.run([str(Path(sys.executable).parent / "diffrl"), "train", str(path),
                               *(["--num-processes", str(processes)] if processes > 1 else [])],
                              cwd=str(ROOT), stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = (scratch / "stdout.txt").read_text().strip().splitlines()[-2:]
        raise SystemExit(f"error: diffrl train stopped (exit {done.returncode}): {' | '.join(tail)}")


def diffrl_curve(rows: list[dict]) -> dict:
    """Evaluation reward by step and by training seconds (sum of step_time), median seconds per step."""
    seconds, evals, train = 0.0, [], []
    for r in rows:
        seconds += r.get("step_time", 0.0)
        if "reward" in r:
            train.append(r["reward"])
        if "eval/reward" in r:
            evals.append({"epoch": r["step"], "reward": r["eval/reward"], "seconds": seconds})
    times = [r["step_time"] for r in rows if "step_time" in r]
    return {"evals": evals, "train_reward": train, "seconds_per_rollout": statistics.median(times)}


def awm_config(repo: Path, dataset: Path, seed: int, scratch: Path, epochs: int) -> str:
    s, a = SETTINGS, AWM_SETTINGS
    return public_config("dgx_awm", repo / "config/dgx_awm.py", "ocr_sd3_no_cfg_1node", {
        **common_values(dataset, seed, scratch, a["eval_every"]),
        "num_epochs": epochs + 3,   # epochs 0 and 1 train nothing; epoch epochs + 2 is evaluated
        "sample.num_steps": a["num_steps"], "sample.eval_num_steps": a["eval_num_steps"],
        "sample.noise_level": a["noise_level"], "sample.train_batch_size": a["sample_batch"],
        "sample.num_batches_per_epoch": 1, "sample.test_batch_size": s["eval_prompts"] // a["processes"],
        "train.batch_size": a["train_batch"],
        "train.gradient_accumulation_steps": a["sample_batch"] // a["train_batch"],
        "train.num_batches_per_epoch": a["sample_batch"] // a["train_batch"],
        "train.train_timesteps": a["train_timesteps"], "train.learning_rate": a["lr"], "train.beta": a["beta"],
        "train.ema_beta": a["ema_beta"], "train.ema_decay": a["weight_ema_decay"]})


def diffrl_awm_config(dataset: Path, seed: int, scratch: Path, epochs: int) -> dict:
    a = AWM_SETTINGS
    return diffrl_config(
        "awm", dataset, seed, scratch, epochs, lr=a["lr"], eval_every=a["eval_every"],
        sampling={"num_steps": a["num_steps"], "eval_num_steps": a["eval_num_steps"],
                  "noise_level": a["noise_level"], "sampler": "sa_solver", "sa_tau_range": [0.3, 0.9]},
        prompts_per_step=2, sample_batch_size=a["sample_batch"], train_batch_size=a["train_batch"],
        train_timesteps=a["train_timesteps"], time_type="discrete_wo_init", weighting="ghuber", beta=a["beta"],
        ema_beta=a["ema_beta"], weight_ema_decay=a["weight_ema_decay"])


def awm_public_curve(rows: list[dict]) -> dict:
    """AWM's script skips its first two epochs (no rollout), evaluates at the start of every eval_freq-th epoch
    and logs each epoch's ``epoch_time``: the evaluation reward by trained rollouts and by training seconds
    (each epoch's time less the evaluation inside it), and the median seconds of an epoch without one."""
    evals, clean, train, seconds = [], [], [], 0.0
    epoch, previous, pending = None, None, 0.0
    for r in rows:
        if "eval_reward_non_ema_avg" in r:
            pending = r["time"] - previous if previous is not None else 0.0
            evals.append({"epoch": (epoch + 1 if epoch is not None else 0) - 2, "reward": r["eval_reward_non_ema_avg"],
                          "seconds": seconds})
        if "epoch" in r and "reward_avg" in r:
            epoch = int(r["epoch"])
            train.append(r["reward_avg"])
        if "epoch_time" in r:
            if pending == 0.0:
                clean.append(r["epoch_time"])
            seconds += r["epoch_time"] - pending
            pending = 0.0
        previous = r["time"]
    return {"evals": evals, "train_reward": train,
            "seconds_per_rollout": statistics.median(clean) if clean else None}


def run_seeds(pair: str, result: dict, seeds: list[int], public, diffrl) -> None:
    """Per seed, ``public(seed)`` then ``diffrl(seed)`` (each a curve), one after the other, into ``result``."""
    for seed in seeds:
        for side, run in (("public", public), ("diffrl", diffrl)):
            started = time.time()
            result[side].append({**run(seed), "wall_seconds": time.time() - started})
            print(f"{pair} {side} seed {seed}: {result[side][-1]['evals'][-1]}", flush=True)


def awm_pair(repo: Path, seeds: list[int], epochs: int, work: Path) -> dict:
    dataset = pair_prompts(work)
    site = public_site(work)
    result = {"pair": "awm", "public_repo": str(repo), "model": str(MODEL), "reward": "jpeg_compressibility",
              "settings": {**SETTINGS, **AWM_SETTINGS}, "epochs": epochs, "seeds": seeds, "public": [],
              "diffrl": []}
    processes = AWM_SETTINGS["processes"]
    # The public script evaluates at the start of epochs eval_freq, 2 eval_freq, ... and trains from epoch 2 on:
    # both sides train the rollouts up to the last evaluation that fits in ``epochs`` (the public run trains one
    # more rollout after it, not counted).
    every = AWM_SETTINGS["eval_every"]
    epochs = (epochs + 2) // every * every - 2
    result["epochs"] = epochs

    def public(seed: int) -> dict:
        scratch = work / f"public_seed{seed}"
        return awm_public_curve(run_public(repo, "scripts/train_sd3_awm.py",
                                           awm_config(repo, dataset, seed, scratch, epochs), scratch, site, 10 ** 9,
                                           processes=processes))

    def diffrl(seed: int) -> dict:
        scratch = work / f"diffrl_seed{seed}"
        return run_diffrl(diffrl_awm_config(dataset, seed, scratch, epochs), scratch, processes=processes)

    run_seeds("awm", result, seeds, public, diffrl)
    return result


def plot(pair: str, result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for side, color in (("public", "tab:gray"), ("diffrl", "tab:blue"), ("same_prompts", "tab:orange")):
        for i, run in enumerate(result.get(side, [])):
            epochs = [e["epoch"] for e in run["evals"]]
            rewards = [e["reward"] for e in run["evals"]]
            seconds = [e["seconds"] for e in run["evals"]]
            label = {"same_prompts": "diffrl, public draws"}.get(side, side) + f" (seed {result['seeds'][i]})"
            axes[0].plot(epochs, rewards, color=color, alpha=0.8, marker="o", ms=3, label=label)
            axes[1].plot(seconds, rewards, color=color, alpha=0.8, marker="o", ms=3, label=label)
    axes[0].set_xlabel("rollouts (epochs)")
    axes[1].set_xlabel("training seconds (evaluation excluded)")
    for ax in axes:
        ax.set_ylabel("evaluation reward")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{pair}: public code vs diffrl, {result['reward']}, {Path(result['model']).name}")
    fig.tight_layout()
    fig.savefig(out / f"{pair}.png", dpi=110)


def pair_prompts(work: Path) -> Path:
    """The model's prompts as a flow_grpo ``general_ocr`` dataset folder: train.txt, and its first
    ``eval_prompts`` as test.txt."""
    prompts = [p for p in (MODEL / "prompts.txt").read_text().splitlines() if p.strip()]
    dataset = work / "dataset"
    write_prompts(dataset, prompts, prompts[:SETTINGS["eval_prompts"]])
    return dataset


def flow_grpo_pair(repo: Path, seeds: list[int], epochs: int, work: Path) -> dict:
    dataset = pair_prompts(work)
    site = public_site(work)
    result = {"pair": "flow_grpo", "public_repo": str(repo), "model": str(MODEL), "reward": "jpeg_compressibility",
              "settings": SETTINGS, "epochs": epochs, "seeds": seeds, "public": [], "diffrl": []}

    def public(seed: int) -> dict:
        scratch = work / f"public_seed{seed}"
        return public_curve(run_public(repo, "scripts/train_sd3.py", flow_grpo_config(repo, dataset, seed, scratch),
                                       scratch, site, epochs))

    def diffrl(seed: int) -> dict:
        scratch = work / f"diffrl_seed{seed}"
        return run_diffrl(diffrl_flow_grpo_config(dataset, seed, scratch, epochs), scratch)

    run_seeds("flow_grpo", result, seeds, public, diffrl)
    # A third arm: diffrl drawing the public run's prompts in the public run's order (a draw, not a setting).
    draws = replay_public_prompts(repo, dataset, site, work / f"public_seed{seeds[0]}" / "shim", epochs)
    result["same_prompts"] = []
    for seed in seeds:
        scratch = work / f"same_prompts_seed{seed}"
        config = diffrl_flow_grpo_config(dataset, seed, scratch, epochs)
        config["data"]["path"] = str(drawn_in_order(draws, seed, work / f"public_draws_seed{seed}.txt"))
        result["same_prompts"].append(run_diffrl(config, scratch))
        print(f"flow_grpo diffrl, the public draws, seed {seed}: {result['same_prompts'][-1]['evals'][-1]}",
              flush=True)
    return result


def summarise(result: dict) -> dict:
    def median(side, key):
        values = [run[key] for run in result[side] if run[key] is not None]
        return statistics.median(values) if values else None

    finals = {side: [run["evals"][-1]["reward"] for run in result[side]]
              for side in ("public", "diffrl", "same_prompts") if result.get(side)}
    public_s, diffrl_s = median("public", "seconds_per_rollout"), median("diffrl", "seconds_per_rollout")
    return {"final_eval_reward": {side: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                                  for side, v in finals.items()},
            "seconds_per_rollout": {"public": public_s, "diffrl": diffrl_s},
            "speedup": public_s / diffrl_s if public_s and diffrl_s else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flow-grpo", type=Path, help="a checkout of yifan123/flow_grpo")
    parser.add_argument("--awm", type=Path, help="a checkout of scxue/advantage_weighted_matching")
    parser.add_argument("--nft", type=Path, help="a checkout of NVlabs/DiffusionNFT")
    parser.add_argument("--d1", type=Path, help="a checkout of dllm-reasoning/d1")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/bench/vs_public")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs/vs_public")
    args = parser.parse_args()
    args.out, args.work = args.out.resolve(), args.work.resolve()   # the public code runs from its own folder
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = {"flow_grpo": flow_grpo_pair, "awm": awm_pair}
    scripts = {"flow_grpo": "scripts/train_sd3.py",
               "awm": "scripts/train_sd3_awm.py (in the repository's advantage_weighted_matching folder)"}
    for name, path in (("flow_grpo", args.flow_grpo), ("awm", args.awm), ("nft", args.nft), ("d1", args.d1)):
        if path is None:
            print(f"note: --{name.replace('_', '-')} not given: the {name} pair is skipped")
            continue
        if name not in pairs:
            print(f"note: the {name} pair is not built yet (docs/vs_public.md says why): skipped")
            continue
        script = scripts[name].split()[0]
        if not (path / script).is_file():
            raise SystemExit(f"error: --{name.replace('_', '-')} {path} has no {script}: give the folder that holds "
                             f"{scripts[name]}")
        result = pairs[name](path.resolve(), args.seeds, args.epochs, args.work / name)
        result["summary"] = summarise(result)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
        plot(name, result, args.out)
        print(json.dumps(result["summary"], indent=1))
        print(f"wrote {args.out / name}.json and .png")


if __name__ == "__main__":
    main()
