"""One training update of AWM, Flow-GRPO and IGPO at real size: step time, peak memory, FLOPs and MFU.

    python scripts/bench/gpu_step.py [--scale real|tiny] [--only awm/sd3.5-medium ...] [--modes lora full]
                                     [--steps 3] [--out outputs/bench/gpu_step.json]

The trained networks are built from the architecture files in assets/configs/ (SD3.5-Medium, FLUX.1-dev and
Wan2.1-1.3B transformers; LLaDA-8B's dimensions as a Llama config) with random weights: nothing is
downloaded. The shapes (resolution, frames, tokens, per-GPU micro-batch, timesteps per update, CFG, KL) come
from the shipped published configs (configs/awm/sd35m_ocr.yaml, ...). Text encoders and VAEs are skipped:
their outputs enter as random tensors of the right shape, since an update step does not run them (the
rollout does, and is not timed here).

What one update is, per trainer (forward + backward of the trained network, then one AdamW step):
  awm        train_timesteps x (policy forward/backward on the micro-batch; one no-grad reference forward
             when beta > 0)
  flow_grpo  int(num_steps x timestep_fraction) SDE steps (Fast: its window) x (forward/backward, the CFG
             batch doubled when guidance_scale > 1 (FLUX: its guidance embedding); one no-grad reference
             forward when beta > 0)
  igpo       one micro-batch of prompt + completion tokens (d1's one-pass log-prob), plus the reference
             forward when beta > 0
FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on the first update (matmuls and attention;
elementwise work is not counted, so MFU is a lower bound). MFU = FLOPs / step time / the GPU's dense bf16
peak (H100 / H200 989 TFLOP/s, A100 312, L40S 362; others: not computed). bf16 on a GPU; float32 on CPU
(``--scale tiny``, for the tests: tiny widths, same code path).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from diffrl.dllm.masked_lm import MaskedDiffusionLM  # noqa: E402
from diffrl.models.flow import FluxModel, SD3Model, WanModel  # noqa: E402
from diffrl.models.lora import add_lora  # noqa: E402
from diffrl.models.performance import enable_gradient_checkpointing  # noqa: E402
from diffrl.trainers import load_config  # noqa: E402  (after the path: runs from a checkout too)

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


@dataclass
class Workload:
    trainer: str
    model: str
    family: str            # sd3, flux, wan, dllm
    architecture: str      # assets/configs/*.json
    config: str            # the published training config its shapes come from


WORKLOADS = [
    Workload("awm", "sd3.5-medium", "sd3", "sd35_medium_transformer.json", "configs/awm/sd35m_ocr.yaml"),
    Workload("flow_grpo", "sd3.5-medium", "sd3", "sd35_medium_transformer.json", "configs/flow_grpo/sd35m_ocr.yaml"),
    Workload("awm", "flux.1-dev", "flux", "flux1_dev_transformer.json", "configs/awm/flux1_dev_pickscore.yaml"),
    Workload("flow_grpo", "flux.1-dev", "flux", "flux1_dev_transformer.json",
             "configs/flow_grpo/flux1_dev_pickscore.yaml"),
    Workload("awm", "wan2.1-1.3b", "wan", "wan21_1.3b_transformer.json", "configs/awm/wan21_1.3b_video.yaml"),
    Workload("igpo", "llada-8b", "dllm", "llada_8b.json", "configs/igpo/llada_8b_metamath.yaml"),
]

# Each family's default LoRA targets, as its model class declares them.
LORA_TARGETS = {"sd3": SD3Model.lora_targets, "flux": FluxModel.lora_targets, "wan": WanModel.lora_targets,
                "dllm": MaskedDiffusionLM.lora_targets}

TINY = {  # widths small enough for a CPU test; the layer types stay those of the real model
    "sd3": dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, joint_attention_dim=32,
                caption_projection_dim=16, pooled_projection_dim=16, dual_attention_layers=[0],
                pos_embed_max_size=16, sample_size=8),
    "flux": dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16,
                 axes_dims_rope=[4, 6, 6], joint_attention_dim=32, pooled_projection_dim=16, in_channels=16),
    "wan": dict(num_layers=1, num_attention_heads=2, attention_head_dim=16, ffn_dim=32, text_dim=32,
                freq_dim=16, rope_max_seq_len=32),
    "dllm": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=128),
}


def build(work: Workload, scale: str, device, dtype):
    spec = json.loads((ROOT / "assets" / "configs" / work.architecture).read_text())
    spec = {k: v for k, v in spec.items() if not k.startswith("_")}
    if scale == "tiny":
        spec.update(TINY[work.family])
    with torch.device(device):
        if work.family == "dllm":
            from transformers import LlamaConfig, LlamaForCausalLM

            spec.pop("model_type", None)
            net = LlamaForCausalLM(LlamaConfig(**spec, use_cache=False))
        else:
            import diffusers

            cls = {"sd3": diffusers.SD3Transformer2DModel, "flux": diffusers.FluxTransformer2DModel,
                   "wan": diffusers.WanTransformer3DModel}[work.family]
            net = cls.from_config(spec)
    return net if dtype == torch.float32 else net.to(dtype), spec


def inputs(work: Workload, cfg, spec: dict, scale: str, device, dtype) -> tuple[dict, int]:
    """Random inputs of the published shapes and the micro-batch size."""
    tiny = scale == "tiny"
    b = 1 if tiny else cfg.train_batch_size
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    if work.family == "dllm":
        length = 16 if tiny else 256 + cfg.generation.gen_length  # IGPO's prompt budget + completion
        return {"input_ids": torch.randint(0, spec["vocab_size"], (b, length), device=device)}, b
    s = cfg.sampling
    height, width = (64, 64) if tiny else (s.height, s.width)
    text = 8 if tiny else (s.max_sequence_length or (256 if work.family == "sd3" else 512))
    t = torch.full((b,), 0.5, device=device, dtype=dtype)
    if work.family == "sd3":
        return {"hidden_states": rand(b, 16, height // 8, width // 8),
                "encoder_hidden_states": rand(b, 77 + text, spec["joint_attention_dim"]),
                "pooled_projections": rand(b, spec["pooled_projection_dim"]), "timestep": t * 1000}, b
    if work.family == "flux":
        h, w = height // 16, width // 16
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(),
                                         indexing="ij"), -1)
        return {"hidden_states": rand(b, h * w, spec["in_channels"]),
                "encoder_hidden_states": rand(b, text, spec["joint_attention_dim"]),
                "pooled_projections": rand(b, spec["pooled_projection_dim"]), "timestep": t,
                "img_ids": ids.reshape(-1, 3).to(device, dtype), "txt_ids": torch.zeros(text, 3, device=device,
                                                                                        dtype=dtype),
                "guidance": torch.full((b,), s.guidance_scale, device=device, dtype=dtype)}, b
    frames = (5 if tiny else s.num_frames) // 4 + 1
    return {"hidden_states": rand(b, 16, frames, height // 8, width // 8),
            "encoder_hidden_states": rand(b, text, spec["text_dim"]), "timestep": t * 1000}, b


def prediction(net, batch: dict, family: str) -> torch.Tensor:
    if family == "dllm":
        return net(**batch).logits
    return net(**batch, return_dict=False)[0]


def double(batch: dict) -> dict:
    """The CFG batch: conditional and unconditional rows in one forward (Flow-GRPO's training forward)."""
    return {k: torch.cat([v, v]) if k not in ("img_ids", "txt_ids") else v for k, v in batch.items()}


def update(work: Workload, cfg, net, batch: dict, optimizer) -> None:
    """One update as the module docstring defines it."""
    family = work.family
    beta = getattr(cfg, "beta", 0.0)
    if work.trainer == "igpo":
        repeats, forward_batch = 1, batch
    elif work.trainer == "awm":
        repeats, forward_batch = cfg.train_timesteps, batch
    else:
        window = cfg.sampling.sde_window_size  # Flow-GRPO-Fast trains its window only
        repeats = window or max(1, int(cfg.sampling.num_steps * cfg.timestep_fraction))
        forward_batch = double(batch) if cfg.sampling.guidance_scale > 1 and family != "flux" else batch
    for _ in range(repeats):
        out = prediction(net, forward_batch, family)
        if beta > 0:
            with torch.no_grad():
                reference = prediction(net, forward_batch, family)
            loss = out.float().pow(2).mean() + beta * (out.float() - reference.float()).pow(2).mean()
        else:
            loss = out.float().pow(2).mean()
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(work: Workload, mode: str, scale: str, steps: int, device) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = load_config(ROOT / work.config)
    net, spec = build(work, scale, device, dtype)
    checkpointing = bool(cfg.model.gradient_checkpointing)  # as the published config
    if checkpointing:
        enable_gradient_checkpointing(net)   # as diffrl's trainers enable it
    if mode == "lora":
        lora = cfg.lora
        add_lora(net, list(LORA_TARGETS[work.family]), rank=lora.rank, alpha=lora.alpha,
                 target_modules=lora.target_modules)
    else:
        net.requires_grad_(True)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:  # the trained weights in float32, as the trainers keep them
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    batch, micro_batch = inputs(work, cfg, spec, scale, device, dtype)
    row = {"trainer": work.trainer, "model": work.model, "mode": mode, "micro_batch": micro_batch,
           "trained_parameters": sum(p.numel() for p in params),
           "all_parameters": sum(p.numel() for p in net.parameters()), "gradient_checkpointing": checkpointing}
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=cuda), FlopCounterMode(display=False) as counter:
            update(work, cfg, net, batch, optimizer)  # also the warm-up
        row["flops"] = counter.get_total_flops()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                update(work, cfg, net, batch, optimizer)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        return row
    finally:
        del net, optimizer
        if cuda:
            torch.cuda.empty_cache()
    row["step_seconds"] = statistics.median(times)
    row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if cuda else None
    row["tflops_per_second"] = row["flops"] / row["step_seconds"] / 1e12
    row["mfu"] = row["flops"] / row["step_seconds"] / peak if peak else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["real", "tiny"], default="real")
    parser.add_argument("--only", nargs="*", default=None, help="trainer/model pairs, e.g. awm/sd3.5-medium")
    parser.add_argument("--modes", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    parser.add_argument("--steps", type=int, default=3, help="timed updates after the counted warm-up")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "gpu_step.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and args.scale == "real" else "cpu")
    if args.scale == "real" and device.type != "cuda":
        raise SystemExit("error: --scale real needs a GPU; use --scale tiny on CPU")
    chosen = [w for w in WORKLOADS if not args.only or f"{w.trainer}/{w.model}" in args.only]
    rows = []
    print(f"{'trainer':10s} {'model':13s} {'mode':5s} {'batch':>5s} {'trained':>9s} {'s/step':>8s} "
          f"{'GiB':>6s} {'FLOPs':>9s} {'MFU':>6s}")
    for work in chosen:
        for mode in args.modes:
            row = measure(work, mode, args.scale, args.steps, device)
            rows.append(row)
            if "error" in row:
                print(f"{work.trainer:10s} {work.model:13s} {mode:5s} {row['error']}", flush=True)
                continue
            gib = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "-"
            mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
            print(f"{work.trainer:10s} {work.model:13s} {mode:5s} {row['micro_batch']:5d} "
                  f"{row['trained_parameters'] / 1e6:8.1f}M {row['step_seconds']:8.3f} {gib:>6s} "
                  f"{row['flops']:9.3g} {mfu:>6s}", flush=True)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"scale": args.scale, "device": device_name, "torch": torch.__version__,
                                    "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
