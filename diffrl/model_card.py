"""Sharing a run: a folder with the trained weights (LoRA in diffusers / peft format, or full weights), the
resolved config, the run's curves and last sample grid, and a model card (README.md) that says what was
trained on what, with which reward, and how it went; pushed with huggingface_hub, or only written."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import yaml

from diffrl import secrets
from diffrl.errors import ConfigError, DiffrlError


def _evaluations(run_dir: Path) -> list[dict]:
    """The logged evaluations: step and the finite ``eval/`` numbers of each row that has some."""
    from diffrl.report import read_metrics

    if not (run_dir / "metrics.jsonl").is_file():
        return []
    rows = []
    for row in read_metrics(run_dir):
        numbers = {k: v for k, v in row.items()
                   if k.startswith("eval/") and isinstance(v, (int, float)) and math.isfinite(v)}
        if numbers:
            rows.append({"step": row["step"], **numbers})
    return rows


def model_card(config: dict, run_dir: Path, *, repo_id: str, weights: str, step: int | None) -> str:
    """README.md of the shared folder: front matter for the hub, then what, how, results and usage."""
    from diffrl import __version__
    from diffrl.inference import TEXT_TRAINERS
    from diffrl.trainers import available_trainers

    trainer, base = config["trainer"], config["model"]["path"]
    lora = bool(config.get("lora", {}).get("enabled"))
    text = trainer in TEXT_TRAINERS
    front = {"base_model": base, "library_name": "peft" if lora and text else "diffusers" if not text
             else "transformers", "tags": ["diffrl", trainer, *(["lora"] if lora else [])]}
    reward = config.get("reward", {}).get("weights") if isinstance(config.get("reward"), dict) else None
    evals = _evaluations(run_dir)
    keys = sorted({k for r in evals for k in r if k != "step"})
    table = "\n".join(["| step | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys),
                       *[f"| {r['step']} | " + " | ".join(f"{r[k]:.4g}" if k in r else "" for k in keys) + " |"
                         for r in evals]]) if evals else "(no evaluation was logged)"
    summary = (run_dir / "summary.txt").read_text(encoding="utf-8").strip() if (run_dir / "summary.txt").is_file() \
        else "(no summary: run `diffrl report` on the run folder)"
    if text:
        from diffrl.dllm.diffusion_gemma import is_diffusion_gemma
        from diffrl.dllm.llada2 import is_llada2
        from diffrl.dllm.sdar import is_sdar

        # LLaDA and Dream ship their own modelling code and register it under AutoModel, not AutoModelForMaskedLM;
        # SDAR's and LLaDA 2.x's checkpoints carry theirs (diffrl reads them as Qwen3 / Glm4Moe with its block masks).
        block = is_sdar(base) or is_llada2(base)
        remote = bool(config["model"].get("trust_remote_code")) or block
        cls = ("AutoModelForCausalLM" if block else "DiffusionGemmaForBlockDiffusion" if is_diffusion_gemma(base)
               else "AutoModel" if remote else "AutoModelForMaskedLM")
        code = ", trust_remote_code=True" if remote else ""
        usage = (f"```python\nfrom peft import PeftModel\nfrom transformers import {cls}\n"
                 f"model = PeftModel.from_pretrained({cls}.from_pretrained(\"{base}\"{code}), "
                 f"\"{repo_id}\")\n```" if lora else
                 f"```python\nfrom transformers import {cls}, AutoTokenizer\n"
                 f"model = {cls}.from_pretrained(\"{repo_id}\"{code})\n```")
    else:
        usage = (f"```python\nfrom diffusers import DiffusionPipeline\npipe = DiffusionPipeline.from_pretrained("
                 f"\"{base}\")\n" + (f"pipe.load_lora_weights(\"{repo_id}\")\n" if lora else "") + "```")
        if not lora:
            usage += f"\n\nThe full trained {'transformer' if 'sd3' in base.lower() else 'denoiser'} weights are " \
                     f"in this folder; load them into the pipeline's denoiser with `from_pretrained`."
    images = "\n".join(f"![{name}]({name})" for name in ("report.png", "samples.png") if (run_dir / name).is_file()
                       or name == "samples.png" and (run_dir / "samples").is_dir())
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {repo_id}

{'LoRA adapter' if lora else 'Weights'} trained from [`{base}`](https://huggingface.co/{base}) with diffrl
{__version__}'s `{trainer}` trainer ([paper]({available_trainers()[trainer].paper})), {weights} weights
{f'of step {step}' if step is not None else ''}; reward: {json.dumps(reward) if reward else 'none (supervised)'}.
The full resolved config is `config.yaml`: `diffrl train config.yaml` reruns it.

## Results

```text
{summary}
```

{table}

{images}

## Use

{usage}
"""


def prepare(run: str | Path, out: str | Path, *, repo_id: str, weights: str = "raw") -> Path:
    """Write the folder that would be pushed: weights, config.yaml, summary, curves, last grid, README.md."""
    from diffrl.inference import resolve_run

    run_dir, checkpoint = resolve_run(run)
    if checkpoint is None:
        raise DiffrlError(f"{run_dir} has no checkpoint yet: nothing trained to share")
    source = checkpoint / "model" / ("ema" if weights == "ema" else "")
    if not source.is_dir():
        raise ConfigError(f"{checkpoint} holds no weight EMA; share the raw weights (--weights raw)")
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    found = secrets.literal_secrets(config)
    if found:  # a config saved before diffrl redacted secrets
        raise DiffrlError(f"{run_dir / 'config.yaml'} holds a secret in clear ({', '.join(found)}); replace it by "
                          f"env:NAME (or <redacted>) in that file before sharing the run")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DiffrlError(f"{out} is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, out / item.name)
    shutil.copy2(run_dir / "config.yaml", out / "config.yaml")
    for name in ("summary.json", "summary.txt", "report.png"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / name)
    grids = sorted((run_dir / "samples").glob("step-*.png")) if (run_dir / "samples").is_dir() else []
    if grids:
        shutil.copy2(grids[-1], out / "samples.png")
    step = json.loads((checkpoint / "trainer_state.json").read_text()).get("step")
    (out / "README.md").write_text(model_card(config, run_dir, repo_id=repo_id, weights=weights, step=step),
                                   encoding="utf-8")
    return out


def push(run: str | Path, repo_id: str, *, weights: str = "raw", private: bool = False) -> str:
    """Prepare the folder in a temporary place and upload it to ``repo_id`` (created if missing)."""
    import tempfile

    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        folder = prepare(run, Path(tmp) / "upload", repo_id=repo_id, weights=weights)
        api = HfApi()
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                     commit_message="Upload a diffrl run")
        except Exception as e:  # network, authentication, permissions: one line with the hub's reason
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise DiffrlError(f"push to {repo_id} failed ({reason}); log in with `huggingface-cli login`, or "
                              f"write the folder only with --folder DIR") from None
    return str(getattr(info, "commit_url", info))
