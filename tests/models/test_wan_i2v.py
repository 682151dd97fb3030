"""Wan image-to-video (2.1 with its CLIP vision encoder; 2.2 A14B's two experts) on the tiny pipelines: the
sampler equals WanImageToVideoPipeline with and without CFG, the first frame reaches the model per sample, and
the LoRA loads with the stock pipeline."""

import warnings

import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from diffrl.models.flow import FlowModel, detect_family
from diffrl.samplers.flow import initial_noise, sample_ode


def noisy_image(seed: int) -> Image.Image:
    pixels = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray((pixels * 255).round().byte().numpy())


def image_to_video(tiny_dir, kind) -> FlowModel:
    model = FlowModel.from_pretrained(tiny_dir(kind))
    model.set_input_image_size(32, 32, 5)
    return model


def stock(tiny_dir, kind):
    pipe = DiffusionPipeline.from_pretrained(tiny_dir(kind))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["wan_i2v", "wan22_i2v"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampling_equals_the_stock_image_to_video_pipeline(tiny_dir, kind, guidance):
    assert detect_family(tiny_dir(kind)) == "wan_i2v"
    model = image_to_video(tiny_dir, kind)
    assert model.has_two_experts == (kind == "wan22_i2v") and model.is_video
    image, prompts = noisy_image(3), ["a cat walks", "a cat walks"]  # the pipeline takes one image per call
    noise = initial_noise(2, model.latent_shape(32, 32, 5), generator=torch.Generator().manual_seed(0))
    ours = model.decode(sample_ode(model, model.encode_prompts(prompts, [image, image]), num_steps=4, height=32,
                                   width=32, num_frames=5, guidance_scale=guidance, uncond=model.null_condition(),
                                   latents=noise.clone()))
    ref = stock(tiny_dir, kind)(image=image, prompt=prompts, negative_prompt=["", ""], latents=noise,
                                num_inference_steps=4, height=32, width=32, num_frames=5, guidance_scale=guidance,
                                output_type="pt").frames
    assert ours.shape == (2, 5, 3, 32, 32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["wan_i2v", "wan22_i2v"])
def test_each_sample_sees_its_own_first_frame(tiny_dir, kind):
    model = image_to_video(tiny_dir, kind)
    cond = model.encode_prompts(["a", "a"], [noisy_image(1), noisy_image(2)])
    assert cond.image.shape == (2, 4 + 16, *model.latent_shape(32, 32, 5)[1:])  # mask channels + latents
    assert (cond.image_embeds is not None) == (kind == "wan_i2v")  # Wan 2.1 also reads CLIP vision features
    one = torch.randn((1, *model.latent_shape(32, 32, 5)), generator=torch.Generator().manual_seed(0))
    latents, t = one.repeat(2, 1, 1, 1, 1), torch.tensor([0.7, 0.3])  # Wan 2.2: one sample per expert
    v = model.velocity(latents, t, cond)
    v_swapped = model.velocity(latents, t, cond[torch.tensor([1, 0])])  # same prompt, the images swapped
    assert (v - v_swapped).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-3  # another first frame, another velocity
    for i in range(2):  # a sample's velocity does not depend on its neighbour in the batch
        torch.testing.assert_close(model.velocity(latents[i:i + 1], t[i:i + 1], cond[i:i + 1]), v[i:i + 1],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["wan_i2v", "wan22_i2v"])
def test_lora_loads_with_the_stock_pipeline_without_warnings(tiny_dir, tmp_path, kind):
    model = image_to_video(tiny_dir, kind)
    model.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_()
    latents = torch.randn((2, *model.latent_shape(32, 32, 5)), generator=torch.Generator().manual_seed(0))
    cond, t = model.encode_prompts(["a cat", "a dog"], [noisy_image(4), noisy_image(5)]), torch.tensor([0.6, 0.3])
    v_lora = model.velocity(latents, t, cond)
    with model.reference():
        assert (model.velocity(latents, t, cond) - v_lora).abs().max() > 1e-3
    model.save_lora(tmp_path)
    pipe = stock(tiny_dir, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.load_lora_weights(tmp_path)
        if kind == "wan22_i2v":
            pipe.load_lora_weights(tmp_path / "transformer_2", load_into_transformer_2=True)
    torch.testing.assert_close(FlowModel.from_pipeline(pipe).velocity(latents, t, cond), v_lora, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pipeline_class", ["WanPipeline", "WanImageToVideoPipeline"])
def test_ti2v_5b_per_token_timesteps_equal_the_stock_pipelines(tiny_dir, pipeline_class):
    """Wan 2.2 TI2V-5B: one checkpoint (a WanPipeline), text-to-video as saved, image-to-video when opened as a
    WanImageToVideoPipeline; both equal the stock pipeline of that class (which pads prompts to 512 tokens)."""
    import diffusers

    i2v = pipeline_class == "WanImageToVideoPipeline"
    model = FlowModel.from_pretrained(tiny_dir("wan22_ti2v"), pipeline_class=pipeline_class if i2v else None,
                                      max_sequence_length=512)
    assert model.family == ("wan_i2v" if i2v else "wan") and model.needs_input_image == i2v
    image = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    if i2v:
        model.set_input_image_size(64, 64, 5)
    prompts = ["a cat walks", "a cat walks"]
    cond = model.encode_prompts(prompts, [image, image] if i2v else None)
    noise = initial_noise(2, model.latent_shape(64, 64, 5), generator=torch.Generator().manual_seed(0))
    latents = sample_ode(model, cond, num_steps=4, height=64, width=64, num_frames=5, guidance_scale=4.0,
                         uncond=model.null_condition(), latents=noise.clone())
    pipe = getattr(diffusers, pipeline_class).from_pretrained(tiny_dir("wan22_ti2v"))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt=prompts, negative_prompt=["", ""], latents=noise, num_inference_steps=4, height=64, width=64,
               num_frames=5, guidance_scale=4.0, output_type="pt", **({"image": image} if i2v else {})).frames
    torch.testing.assert_close(model.decode(latents), ref, atol=1e-5, rtol=0)
    if i2v:  # the first latent frame is pinned: the rollout ends on the image's latents, and the loss there is 0
        assert cond.image.shape == (2, 16, 1, 4, 4)
        torch.testing.assert_close(latents[:, :, :1], cond.image, atol=1e-5, rtol=0)
        x_t = 0.6 * latents + 0.4 * noise
        v = model.velocity(x_t, torch.tensor([0.4, 0.4]), cond)
        torch.testing.assert_close(v[:, :, :1], (noise - latents)[:, :, :1], atol=1e-4, rtol=0)
