import pytest
import torch
from diffusers import DiffusionPipeline

from diffrl.models.unet import EpsilonModel
from diffrl.samplers.generate import sample_latents


def test_ddim_sampling_with_cfg_equals_stock_pipeline(tiny_dir):
    model = EpsilonModel.from_pretrained(tiny_dir("sd15"))
    latents = sample_latents(model, model.encode_prompts(["a cat", "a dog"]), num_steps=3, height=32, width=32,
                           guidance_scale=7.5, uncond=model.encode_prompts([""]),
                           generator=torch.Generator().manual_seed(0))
    ours = model.decode(latents)
    pipe = DiffusionPipeline.from_pretrained(tiny_dir("sd15"), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    ref = pipe(["a cat", "a dog"], latents=noise, num_inference_steps=3, height=32, width=32, guidance_scale=7.5,
               output_type="pt").images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_add_noise_matches_scheduler(tiny_dir):
    model = EpsilonModel.from_pretrained(tiny_dir("sd15"))
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(model.add_noise(x0, noise, t), model.scheduler.add_noise(x0, noise, t))


def test_unet_lora_loads_with_diffusers(tiny_dir, tmp_path):
    model = EpsilonModel.from_pretrained(tiny_dir("sd15"))
    model.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.normal_()
    model.save_lora(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tiny_dir("sd15"), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(tmp_path)
    cond, x, t = model.encode_prompts(["a"]), torch.randn(1, 4, 16, 16), torch.tensor([300])
    expected = pipe.unet(x, t, encoder_hidden_states=cond.embeds).sample
    torch.testing.assert_close(model.predict_noise(x, t, cond), expected, atol=1e-5, rtol=0)


def test_denoising_error_is_the_epsilon_mse(tiny_dir):
    model = EpsilonModel.from_pretrained(tiny_dir("sd15"))
    cond = model.encode_prompts(["a", "b"])
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    a = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    eps = model.unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=cond.embeds).sample
    expected = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(model.denoising_error(x0, noise, t, cond), expected, atol=1e-6, rtol=1e-5)
    t = model.sample_timesteps(1000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and 0 <= t.min() and t.max() < 1000 and t.float().std() > 250


def test_animatediff_from_base_plus_motion_adapter_equals_stock_pipeline(tiny_dir):
    from diffrl.models import load_diffusion_model

    model = load_diffusion_model(tiny_dir("sd15"), motion_adapter=tiny_dir("animatediff") / "motion_adapter")
    assert model.family == "animatediff" and model.is_video
    assert model.latent_shape(32, 32, 4) == (4, 4, 16, 16)
    latents = sample_latents(model, model.encode_prompts(["a", "b"]), num_steps=3, height=32, width=32, num_frames=4,
                           guidance_scale=7.5, uncond=model.encode_prompts([""]),
                           generator=torch.Generator().manual_seed(0))
    video = model.decode(latents)
    assert video.shape == (2, 4, 3, 32, 32)
    assert model.encode(video).shape == (2, 4, 4, 16, 16)
    from diffusers import AnimateDiffPipeline, MotionAdapter

    adapter = MotionAdapter.from_pretrained(tiny_dir("animatediff") / "motion_adapter")
    pipe = AnimateDiffPipeline.from_pretrained(tiny_dir("sd15"), motion_adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((2, 4, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    ref = pipe(["a", "b"], latents=noise, num_frames=4, num_inference_steps=3, height=32, width=32,
               guidance_scale=7.5, output_type="pt").frames
    torch.testing.assert_close(video, ref, atol=1e-5, rtol=0)


def test_load_diffusion_model_picks_the_adapter(tiny_dir):
    from diffrl.errors import ConfigError
    from diffrl.models import load_diffusion_model
    from diffrl.models.flow import FlowModel

    assert isinstance(load_diffusion_model(tiny_dir("sd3")), FlowModel)
    assert isinstance(load_diffusion_model(tiny_dir("sd15")), EpsilonModel)
    assert load_diffusion_model(tiny_dir("animatediff")).family == "animatediff"
    with pytest.raises(ConfigError, match="motion_adapter is for AnimateDiff on SD1.5"):
        load_diffusion_model(tiny_dir("sd3"), motion_adapter=tiny_dir("animatediff") / "motion_adapter")


def test_sdxl_sampling_with_cfg_equals_stock_pipeline(tiny_dir):
    model = EpsilonModel.from_pretrained(tiny_dir("sdxl"))
    latents = sample_latents(model, model.encode_prompts(["a cat", "a dog"]), num_steps=3, height=32, width=32,
                           guidance_scale=5.0, uncond=model.null_condition(),
                           generator=torch.Generator().manual_seed(0))
    pipe = DiffusionPipeline.from_pretrained(tiny_dir("sdxl"))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    ref = pipe(["a cat", "a dog"], latents=noise, num_inference_steps=3, height=32, width=32, guidance_scale=5.0,
               output_type="pt").images
    torch.testing.assert_close(model.decode(latents), ref, atol=1e-5, rtol=0)
