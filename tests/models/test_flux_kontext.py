"""FLUX.1 Kontext (image editing) on the tiny pipeline: the sampler equals FluxKontextPipeline, the input image
reaches the model, the LoRA loads with the stock pipeline, and the editing prompt folder and its errors."""

import json
import warnings

import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from diffrl.data import load_prompt_records
from diffrl.errors import DataError
from diffrl.models.flow import FlowModel, detect_family
from diffrl.models.flow.base import pack_patches
from diffrl.samplers.flow import initial_noise, sample_ode

PROMPTS = ["make it red", "a dog"]


def noisy_image(seed: int, height: int = 32, width: int = 32) -> Image.Image:
    pixels = torch.rand(height, width, 3, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray((pixels * 255).round().byte().numpy())


def kontext(tiny_dir) -> FlowModel:
    model = FlowModel.from_pretrained(tiny_dir("flux_kontext"))
    model.set_input_image_size(32, 32)
    return model


def stock(tiny_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_dir("flux_kontext"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_family_and_sampling_equal_the_stock_kontext_pipeline(tiny_dir):
    assert detect_family(tiny_dir("flux_kontext")) == "flux_kontext"
    model = kontext(tiny_dir)
    images = [noisy_image(1), noisy_image(2)]
    noise = initial_noise(2, model.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    ours = model.decode(sample_ode(model, model.encode_prompts(PROMPTS, images), num_steps=3, height=32, width=32,
                                   guidance_scale=2.5, latents=noise.clone()))
    # The stock pipeline at this size: no resize to Kontext's preferred resolutions, max_area the output's.
    ref = stock(tiny_dir)(image=images, prompt=PROMPTS, latents=pack_patches(noise), num_inference_steps=3,
                          height=32, width=32, guidance_scale=2.5, output_type="pt", _auto_resize=False,
                          max_area=32 * 32).images
    assert ours.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_the_input_image_changes_the_velocity_and_is_encoded_once_per_file(tiny_dir, tmp_path):
    model = kontext(tiny_dir)
    for i in range(2):
        noisy_image(i).save(tmp_path / f"{i}.png")
    paths = [str(tmp_path / "0.png"), str(tmp_path / "1.png")]
    one = torch.randn((1, *model.latent_shape(32, 32)), generator=torch.Generator().manual_seed(0))
    latents = one.repeat(2, 1, 1, 1)
    t = torch.tensor([0.7, 0.7])
    v_a = model.velocity(latents, t, model.encode_prompts(["a", "a"], paths))
    v_b = model.velocity(latents, t, model.encode_prompts(["a", "a"], paths[::-1]))
    assert (v_a - v_b).abs().max() > 1e-3                  # the model sees the image
    torch.testing.assert_close(v_a[0], v_b[1], atol=1e-6, rtol=0)  # and each sample only its own
    assert sorted(model._input_images.entries) == paths  # two files, two encodings
    with pytest.raises(DataError, match="every prompt needs one"):
        model.encode_prompts(["a"])


def test_lora_loads_with_the_stock_pipeline_without_warnings(tiny_dir, tmp_path):
    model = kontext(tiny_dir)
    model.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_()
    latents = torch.randn((2, *model.latent_shape(32, 32)), generator=torch.Generator().manual_seed(0))
    cond, t = model.encode_prompts(PROMPTS, [noisy_image(3), noisy_image(4)]), torch.tensor([0.6, 0.3])
    v_lora = model.velocity(latents, t, cond)
    with model.reference():
        assert (model.velocity(latents, t, cond) - v_lora).abs().max() > 1e-3
    model.save_lora(tmp_path)
    pipe = stock(tiny_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(FlowModel.from_pipeline(pipe).velocity(latents, t, cond), v_lora, atol=1e-5, rtol=0)


def test_editing_prompt_folder_resolves_images_and_names_its_errors(tiny_dir, tmp_path):
    folder = tiny_dir("edit_prompts")
    prompts, metadata = load_prompt_records(folder)
    assert prompts[0] == "make the background red" and len(prompts) == 4
    assert all(row["image"].startswith(str(folder.resolve())) for row in metadata)
    model = kontext(tiny_dir)  # 40x48 and 32x32 inputs are both resized to the 32x32 output
    assert model.encode_prompts(prompts, [row["image"] for row in metadata]).image.shape == (4, 4, 16, 16)

    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(DataError, match="must hold metadata.jsonl"):
        load_prompt_records(bad)
    (bad / "metadata.jsonl").write_text(json.dumps({"prompt": "x", "image": "missing.png"}) + "\n")
    with pytest.raises(DataError, match=r"metadata.jsonl:1: image 'missing.png' not found"):
        load_prompt_records(bad)
    (bad / "metadata.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match="no 'image' path"):
        load_prompt_records(bad)
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read the image"):
        model.encode_prompts(["x"], [str(bad / "broken.png")])
