"""Benchmark: how much an AWM step costs beyond the model work it contains.

    python scripts/bench/trainer_overhead.py [--steps 3] [--out outputs/bench/trainer_overhead.json]

For the tiny SD3 and a small (~30M-parameter) SD3 transformer, it times whole AWM steps (rollout, decode,
reward, advantages, update, EMA adapter), then the same model work alone in the same run: the sampler's
transformer forwards, the VAE decode, the reward, and the update's forward / backward passes (policy, base
reference and EMA adapter) with the optimizer step. ratio = step time / bare time. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diffrl.config import from_dict  # noqa: E402
from diffrl.models import lora as lora_utils  # noqa: E402
from diffrl.models.tiny import build_sd3  # noqa: E402
from diffrl.trainers.awm import AWMConfig, AWMTrainer  # noqa: E402


def small_sd3(folder: Path) -> None:
    """The tiny pipeline with a ~30M-parameter MMDiT (6 layers, width 384) in place of the tiny one."""
    from diffusers import SD3Transformer2DModel

    pipe = build_sd3()
    torch.manual_seed(0)
    pipe.transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4,
                                             num_layers=6, attention_head_dim=64, num_attention_heads=6,
                                             joint_attention_dim=64, caption_projection_dim=384,
                                             pooled_projection_dim=64, pos_embed_max_size=16)
    pipe.register_modules(transformer=pipe.transformer)
    pipe.save_pretrained(folder)


def config(model_path: str, out: Path, prompts: Path, steps: int) -> AWMConfig:
    return from_dict(AWMConfig, {
        "trainer": "awm", "model": {"path": model_path}, "output_dir": str(out), "max_steps": steps + 1,
        "lora": {"rank": 8, "alpha": 16}, "data": {"path": str(prompts), "eval_size": 0},
        "reward": {"weights": {"jpeg_compressibility": 1.0}},
        "sampling": {"height": 32, "width": 32, "num_steps": 8, "noise_level": 0.0},
        "group_size": 4, "prompts_per_step": 2, "sample_batch_size": 8, "train_batch_size": 4,
        "train_timesteps": 3, "time_type": "discrete", "beta": 1e-3, "ema_beta": 1.0,
        "logging": {"trackers": [], "progress_bar": False}, "checkpoint": {"every": 10_000}})


def bare_work(trainer: AWMTrainer, batch: dict) -> None:
    """The step's model work without the trainer: same shapes, same number of passes."""
    cfg, model = trainer.config, trainer.model
    n = len(batch["prompts"])
    cond = model.encode_prompts(batch["prompts"])  # cached, as in the trainer
    sigmas = batch["sigmas"]
    with torch.no_grad():
        x = torch.randn_like(batch["x0"])
        for i in range(cfg.sampling.num_steps):
            x = x + (sigmas[i + 1] - sigmas[i]) * model.velocity(x, sigmas[i].expand(n), cond)
        samples = model.decode(x)
        trainer.reward(samples, batch["prompts"])
    for start in range(0, n, cfg.train_batch_size):
        sub = slice(start, start + cfg.train_batch_size)
        x0 = batch["x0"][sub].repeat_interleave(cfg.train_timesteps, 0)
        t = torch.rand(x0.shape[0])
        c = cond[sub].repeat_interleave(cfg.train_timesteps)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * torch.randn_like(x0)
        v = model.velocity(x_t, t, c)
        with torch.no_grad():
            with model.reference():
                v_ref = model.velocity(x_t, t, c)
            lora_utils.set_active_adapter(model.transformer, "ema")
            v_ema = model.velocity(x_t, t, c)
            lora_utils.set_active_adapter(model.transformer, "default")
        ((v - x0) ** 2).mean().add(((v - v_ref) ** 2).mean()).add(((v - v_ema) ** 2).mean()).backward()
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def measure(name: str, model_path: str, work: Path, prompts: Path, steps: int) -> dict:
    trainer = AWMTrainer(config(model_path, work / name, prompts, steps))
    trainer.setup()
    params = sum(p.numel() for p in trainer.model.transformer.parameters())

    def one_step():
        batch = trainer.rollout()
        trainer.score(batch)
        trainer.update(batch)
        trainer.step += 1
        trainer._update_ema_adapter()
        return batch

    batch = one_step()  # warm-up: caches prompts, allocations
    start = time.perf_counter()
    for _ in range(steps):
        batch = one_step()
    step_s = (time.perf_counter() - start) / steps
    bare_work(trainer, batch)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        bare_work(trainer, batch)
    bare_s = (time.perf_counter() - start) / steps
    return {"transformer_parameters": params, "step_s": step_s, "bare_s": bare_s, "ratio": step_s / bare_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="outputs/bench/trainer_overhead.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts = work / "prompts.txt"
        prompts.write_text("a red circle\na blue square\na green star\n")
        build_sd3().save_pretrained(work / "tiny")
        small_sd3(work / "small")
        results = {name: measure(name, str(work / name), work, prompts, args.steps) for name in ("tiny", "small")}
    print("AWM step (8 samples, 8 rollout steps, 3 training timesteps, ref + EMA KL) vs its bare model work, CPU")
    for name, r in results.items():
        print(f"  {name:6s} {r['transformer_parameters'] / 1e6:6.2f}M params: step {r['step_s']:.3f} s, "
              f"bare {r['bare_s']:.3f} s, ratio {r['ratio']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "machine": platform.machine()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
