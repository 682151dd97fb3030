"""The small shipped base models (assets/, made by scripts/make_tiny_assets.py) and the quickstarts that
use them: they load through the ordinary from_pretrained path, and one step of each quickstart runs."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import torch

from tests.conftest import REPO_ROOT, run_cli


def _assets_script():
    spec = importlib.util.spec_from_file_location("make_tiny_assets", REPO_ROOT / "scripts/make_tiny_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rendered_training_images_match_their_captions():
    assets = _assets_script()
    first = [assets.render(np.random.default_rng(7)) for _ in range(2)]
    assert np.array_equal(first[0][0], first[1][0]) and first[0][1] == first[1][1]  # seeded: re-runnable
    rng = np.random.default_rng(0)
    for _ in range(50):
        image, caption = assets.render(rng)
        words = caption.split()                       # "a <fg> <shape> on a <bg> background"
        fg, shape, bg = words[1], words[2], words[5]
        pixels = ((image.transpose(1, 2, 0) + 1) * 127.5).round().astype(int).reshape(-1, 3)
        assert tuple(pixels[0]) == assets.COLOURS[bg]                 # a corner shows the background
        assert (pixels == assets.COLOURS[fg]).all(1).sum() >= 20      # and the shape has its colour
        assert shape in assets.SHAPES and image.shape == (3, 32, 32)
    assert len(assets.all_captions()) == len(assets.COLOURS) * (len(assets.COLOURS) - 1) * len(assets.SHAPES)


def test_shipped_image_model_loads_in_diffusers_and_diffrl():
    from diffusers import StableDiffusion3Pipeline

    from diffrl.models.flow import FlowModel

    folder = REPO_ROOT / "assets" / "sd3-shapes"
    info = json.loads((folder / "diffrl_asset.json").read_text())
    assert info["transformer_parameters"] < 5_000_000
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    image = pipe("a red circle on a blue background", num_inference_steps=4, height=32, width=32,
                 guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    model = FlowModel.from_pretrained(folder)
    assert model.family == "sd3"
    prompts = (folder / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 280 and prompts[0].startswith("a red circle on a ")


def test_sign_renders_are_seeded_and_read_by_the_ocr_reward():
    """The text asset's training pictures: the same seed draws the same picture, the held-out strings never
    appear among the training ones, and the demo's OCR setting reads the renders (the calibration the asset
    script prints, here on 12 renders)."""
    from rewards import load_reward

    assets = _assets_script()
    fonts = assets.text_fonts(18)
    a, b = (assets.render_text(np.random.default_rng(3), "47", fonts) for _ in range(2))
    assert np.array_equal(a, b) and a.shape == (3, 32, 32) and a.min() >= -1 and a.max() <= 1
    train, held_out = assets.text_strings(2, 0)
    assert len(train) == 80 and len(held_out) == 20 and not set(train) & set(held_out)
    rng = np.random.default_rng(0)
    strings = held_out[:12]
    images = torch.from_numpy(np.stack([assets.render_text(rng, s, fonts) for s in strings]))
    ocr = load_reward({"ocr": 1.0}, kwargs={"ocr": {"mode": "recognize", "upscale": 4}})
    out = ocr((images + 1) / 2, [assets.TEXT_CAPTION.format(s) for s in strings])
    assert out.extras["ocr/exact_match"].mean() >= 11 / 12


def test_shipped_sign_model_loads_in_diffusers_and_diffrl():
    from diffusers import StableDiffusion3Pipeline

    from diffrl.models.flow import FlowModel

    folder = REPO_ROOT / "assets" / "sd3-text"
    info = json.loads((folder / "diffrl_asset.json").read_text())
    assert info["transformer_parameters"] < 5_000_000 and info["ocr_calibration_clean_renders"] >= 0.95
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    image = pipe('a sign that says "47"', num_inference_steps=4, height=32, width=32, guidance_scale=4.5,
                 generator=torch.Generator().manual_seed(0), output_type="pt", max_sequence_length=26).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    assert FlowModel.from_pretrained(folder).family == "sd3"
    held_out = (folder / "prompts_held_out.txt").read_text().splitlines()
    seen = set((folder / "prompts.txt").read_text().splitlines())
    assert held_out and not seen & set(held_out) and held_out[0].startswith('a sign that says "')


def test_shipped_text_model_loads():
    from diffrl.dllm.masked_lm import MaskedDiffusionLM

    model = MaskedDiffusionLM.from_pretrained(REPO_ROOT / "assets" / "dllm-addition")
    assert model.mask_id == model.tokenizer.mask_token_id
    info = json.loads((REPO_ROOT / "assets/dllm-addition/diffrl_asset.json").read_text())
    assert info["parameters"] < 2e6
    # the range the text demo needs: part of the task solved as the verifier reads it (the last \boxed{...}), more of
    # it solved in either answer format (room for RL), the hardest level nearly never, many all-wrong groups
    assert 0.15 <= info["accuracy"] <= 0.5 and info["accuracy_any_format"] >= info["accuracy"] + 0.1
    assert info["accuracy/4-digit"] < 0.1 and 0.2 <= info["all_wrong@8"] <= 0.65
    assert info["unbraced_fraction"] > 0 and info["format_steps"] > 0


def test_asset_script_refuses_bad_input_in_one_line(tmp_path):
    """scripts/make_tiny_assets.py addition: a missing phase-1 folder, a second phase turned off with
    --start-from, an answer-format share out of range: one ``error:`` line each, no traceback, nothing written."""
    def run(*args):
        return subprocess.run([sys.executable, str(REPO_ROOT / "scripts/make_tiny_assets.py"), "addition",
                               "--out", str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=300)

    for args, message in [
        (["--start-from", str(tmp_path / "gone")], f"error: --start-from {tmp_path / 'gone'}: no model there"),
        (["--start-from", "assets/dllm-addition", "--format-steps", "0"], "error: --start-from runs only the second"),
        (["--start-from", str(REPO_ROOT / "assets/dllm-addition"), "--unbraced-fraction", "1.5"],
         # refused when the asset script's config loads (the generator's options are checked there)
         "error: addition: unbraced_fraction must be between 0 and 1, got 1.5"),
    ]:
        result = run(*args)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message.removeprefix("error: ") in errors[0], result.stderr[-500:]
        assert not (tmp_path / "out").exists()


def test_quickstart_runs_and_writes_its_report(tmp_path):
    out = tmp_path / "quickstart"
    result = run_cli("train", "configs/quickstart.yaml", f"output_dir={out}", "max_steps=2", "data.eval_size=2",
                     "prompts_per_step=2", "group_size=2", "eval_every=0", "logging.progress_bar=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval/reward:" in result.stdout and "report:" in result.stdout
    for name in ("report.png", "summary.txt", "summary.json", "index.html", "samples/step-000000.png",
                 "samples/step-000002.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["eval_start"] <= 1 and "wall_seconds" in summary
    # the OCR demo's side measures: exact-match accuracy and the drift from the first evaluation's pictures
    assert set(summary["side_metrics"]) == {"eval/ocr/exact_match", "eval/drift"}
    assert summary["side_metrics"]["eval/drift"][0] == 0.0 and summary["side_metrics"]["eval/drift"][1] > 0
    assert "eval/ocr/exact_match:" in result.stdout and (out / "samples/first_eval.safetensors").is_file()


def test_text_quickstart_runs(tmp_path):
    out = tmp_path / "quickstart_text"
    result = run_cli("train", "configs/quickstart_text.yaml", f"output_dir={out}", "max_steps=1",
                     "data.eval_size=4", "prompts_per_step=2", "group_size=2", "eval_every=0")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_metric"] == "eval/accuracy" and summary["steps"] == 1
    assert "inpaint_groups" in summary and "train_all_wrong_start" in summary
    assert "igpo: step 1/1 (" in result.stderr  # stderr is a pipe: plain progress lines, no bar


def test_shipped_diffusion_gemma_loads_in_transformers_and_diffrl():
    """assets/diffusiongemma-addition: opens with transformers' own class and generate, and as diffrl's
    DiffusionGemmaLM, and solves one sum with diffrl's sampler."""
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    from diffrl.dllm.diffusion_gemma import DiffusionGemmaLM
    from diffrl.dllm.entropy_bound import generate

    folder = REPO_ROOT / "assets" / "diffusiongemma-addition"
    info = json.loads((folder / "diffrl_asset.json").read_text())
    assert info["parameters"] < 2e6 and info["accuracy"] > info["accuracy/4-digit"]
    module = DiffusionGemmaForBlockDiffusion.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.mask_token_id is None and module.config.canvas_length == 64
    model = DiffusionGemmaLM.from_pretrained(folder)
    ids, mask = model.left_pad(model.chat_prompt_ids(["21+34"]))
    out = generate(model, ids, prompt_mask=mask, gen_length=64, steps=24, greedy=True,
                   generator=torch.Generator().manual_seed(0))
    assert "\\boxed{55}" in model.decode(out)[0]
    torch.manual_seed(0)
    theirs = module.generate(ids, max_new_tokens=64, max_denoising_steps=8).sequences
    assert theirs.shape[1] >= ids.shape[1] + 64
