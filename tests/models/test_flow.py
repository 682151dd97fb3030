"""FlowModel on the tiny SD3, FLUX, Qwen-Image and Wan pipelines, loaded from folders like a hub id."""

import warnings

import pytest
import torch
from diffusers import DiffusionPipeline

from diffrl.errors import ConfigError
from diffrl.models.flow import FlowModel, detect_family
from diffrl.samplers.flow import initial_noise, sample_ode

PROMPTS = ["a red cat", "a dog"]


def stock_pipeline(folder):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind, family", [("sd3", "sd3"), ("flux", "flux"), ("flux2", "flux2"),
                                          ("flux2_klein", "flux2"), ("qwenimage", "qwenimage"),
                                          ("wan", "wan"), ("wan22", "wan")])
def test_family_detected_from_model_index(tiny_dir, kind, family):
    assert detect_family(tiny_dir(kind)) == family


def test_sd3_sampling_equals_stock_pipeline(tiny_dir):
    model = FlowModel.from_pretrained(tiny_dir("sd3"), max_sequence_length=256)  # the pipeline's default
    noise = initial_noise(2, model.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    ours = model.decode(sample_ode(model, model.encode_prompts(PROMPTS), num_steps=3, height=32, width=32,
                                   latents=noise.clone()))
    ref = stock_pipeline(tiny_dir("sd3"))(PROMPTS, latents=noise, num_inference_steps=3, height=32, width=32,
                                          guidance_scale=1.0, output_type="pt").images
    assert ours.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_sd3_cfg_equals_stock_pipeline(tiny_dir):
    model = FlowModel.from_pretrained(tiny_dir("sd3"), max_sequence_length=256)
    noise = initial_noise(2, model.latent_shape(32, 32), generator=torch.Generator().manual_seed(1))
    ours = model.decode(sample_ode(model, model.encode_prompts(PROMPTS), num_steps=2, height=32, width=32,
                                   guidance_scale=4.5, uncond=model.encode_prompts([""]), latents=noise.clone()))
    ref = stock_pipeline(tiny_dir("sd3"))(PROMPTS, negative_prompt=["", ""], latents=noise, num_inference_steps=2,
                                          height=32, width=32, guidance_scale=4.5, output_type="pt").images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_flux_packed_sampling_equals_stock_pipeline(tiny_dir):
    model = FlowModel.from_pretrained(tiny_dir("flux"))
    noise = initial_noise(2, model.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    ours = model.decode(sample_ode(model, model.encode_prompts(PROMPTS), num_steps=3, height=32, width=32,
                                   guidance_scale=3.5, latents=noise.clone()))
    b, c, h, w = noise.shape  # FluxPipeline takes latents already packed into 2x2 patches
    packed = noise.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    ref = stock_pipeline(tiny_dir("flux"))(PROMPTS, latents=packed, num_inference_steps=3, height=32, width=32,
                                           guidance_scale=3.5, output_type="pt").images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def pack(noise):
    """Latents as FluxPipeline / QwenImagePipeline take them: 2x2 patches packed into tokens."""
    b, c, h, w = noise.shape
    return noise.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_qwenimage_sampling_equals_stock_pipeline(tiny_dir, guidance):
    """Prompts of different lengths (the text mask), the exponential resolution shift with a terminal sigma,
    the one-frame VAE with per-channel statistics, and with guidance the pipeline's norm-rescaled true CFG."""
    model = FlowModel.from_pretrained(tiny_dir("qwenimage"))
    noise = initial_noise(2, model.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    assert noise.shape == (2, 4, 16, 16)
    uncond = model.encode_prompts([""]) if guidance > 1 else None
    ours = model.decode(sample_ode(model, model.encode_prompts(PROMPTS), num_steps=3, height=32, width=32,
                                   guidance_scale=guidance, uncond=uncond, latents=noise.clone()))
    kwargs = dict(negative_prompt=["", ""]) if guidance > 1 else {}
    ref = stock_pipeline(tiny_dir("qwenimage"))(PROMPTS, latents=pack(noise), num_inference_steps=3, height=32,
                                                width=32, true_cfg_scale=guidance, output_type="pt", **kwargs).images
    assert ours.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_qwenimage_prompts_keep_their_own_length_in_the_cache(tiny_dir):
    """A cached prompt is stored at its own length and padded (masked) only when batched with longer ones: its
    velocity does not depend on the other prompts of the batch."""
    model = FlowModel.from_pretrained(tiny_dir("qwenimage"))
    short, both = model.encode_prompts(["a dog"]), model.encode_prompts(["a dog", "a much longer red cat prompt"])
    assert short.mask.all() and short.embeds.shape[1] < both.embeds.shape[1]
    assert not both.mask[0].all() and both.mask[1].all()
    latents = torch.randn((2, *model.latent_shape(32, 32)), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.7, 0.7])
    alone = model.velocity(latents[:1], t[:1], short)
    torch.testing.assert_close(model.velocity(latents, t, both)[:1], alone, atol=1e-5, rtol=0)


def test_wan_video_equals_stock_pipeline(tiny_dir):
    model = FlowModel.from_pretrained(tiny_dir("wan"))
    shape = model.latent_shape(32, 32, num_frames=5)
    assert shape == (16, 2, 4, 4)
    noise = initial_noise(1, shape, generator=torch.Generator().manual_seed(0))
    ours = model.decode(sample_ode(model, model.encode_prompts(["a red cat"]), num_steps=2, height=32, width=32,
                                   num_frames=5, latents=noise.clone()))
    ref = stock_pipeline(tiny_dir("wan"))(["a red cat"], latents=noise, num_inference_steps=2, height=32, width=32,
                                          num_frames=5, guidance_scale=1.0, output_type="pt").frames
    assert ours.shape == (1, 5, 3, 32, 32)  # [B, T, 3, H, W]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)  # the pipeline's video post-processing reorders ops


def test_wan22_two_experts_equal_stock_pipeline(tiny_dir):
    """Wan 2.2: each step goes to the expert of its side of the boundary, as in WanPipeline; both are used."""
    model = FlowModel.from_pretrained(tiny_dir("wan22"))
    assert model.has_two_experts and model.transformer.boundary == 500.0
    calls = {"high": 0, "low": 0}
    for name in calls:
        getattr(model.transformer, name).register_forward_pre_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    noise = initial_noise(1, model.latent_shape(32, 32, num_frames=5), generator=torch.Generator().manual_seed(0))
    ours = model.decode(sample_ode(model, model.encode_prompts(["a red cat"]), num_steps=4, height=32, width=32,
                                   num_frames=5, latents=noise.clone()))
    assert calls["high"] > 0 and calls["low"] > 0
    ref = stock_pipeline(tiny_dir("wan22"))(["a red cat"], latents=noise, num_inference_steps=4, height=32, width=32,
                                            num_frames=5, guidance_scale=1.0, output_type="pt").frames
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_wan22_batch_mixing_both_sides_routes_each_sample(tiny_dir):
    """A batch whose timesteps straddle the boundary gives each sample its own expert's velocity."""
    model = FlowModel.from_pretrained(tiny_dir("wan22"))
    latents = torch.randn((2, *model.latent_shape(32, 32, num_frames=5)), generator=torch.Generator().manual_seed(1))
    cond = model.encode_prompts(["a red cat", "a dog"])
    t = torch.tensor([0.8, 0.3])
    both = model.velocity(latents, t, cond)
    for i, expert in enumerate((model.transformer.high, model.transformer.low)):
        alone = expert(hidden_states=latents[i:i + 1], timestep=t[i:i + 1] * 1000,
                       encoder_hidden_states=cond.embeds[i:i + 1], return_dict=False)[0]
        torch.testing.assert_close(both[i:i + 1], alone.float(), atol=1e-5, rtol=0)


def test_prompt_cache_encodes_each_prompt_once(tiny_dir):
    model = FlowModel.from_pretrained(tiny_dir("sd3"))
    calls = []
    original = model._encode_uncached
    model._encode_uncached = lambda prompts: calls.append(list(prompts)) or original(prompts)
    model._prompt_cache.chunk_size = 3
    first = model.encode_prompts(["a", "b", "a"])
    second = model.encode_prompts(["b", "c"])
    assert calls == [["a", "b", "b"], ["c", "c", "c"]]  # fixed-size chunks, padded with the last prompt
    torch.testing.assert_close(first.embeds[1], second.embeds[0])
    torch.testing.assert_close(first.embeds[0], first.embeds[2])


@pytest.mark.parametrize("kind", ["sd3", "flux", "flux2", "flux2_klein", "qwenimage", "wan", "wan22"])
def test_lora_saves_in_diffusers_format(tiny_dir, tmp_path, kind):
    """Our saved LoRA, loaded by diffusers' own `pipe.load_lora_weights` with Python warnings turned into errors
    (SD3's and Qwen-Image's last blocks have no LoRA on their unused text projections: peft must not warn
    about them), gives our velocities
    and keeps alpha / r."""
    model = FlowModel.from_pretrained(tiny_dir(kind))
    model.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_()
    shape = model.latent_shape(32, 32, 5 if kind.startswith("wan") else 1)
    latents = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
    # two timesteps: on Wan 2.2 one falls on each expert's side
    cond, t = model.encode_prompts(["a cat", "a cat"]), torch.tensor([0.6, 0.3])
    v_lora = model.velocity(latents, t, cond)
    with model.reference():
        v_base = model.velocity(latents, t, cond)
    assert (v_lora - v_base).abs().max() > 1e-3  # the adapter does something, and reference() removes it
    model.save_lora(tmp_path)

    pipe = stock_pipeline(tiny_dir(kind))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.load_lora_weights(tmp_path)
        if kind == "wan22":  # the low-noise expert's adapter, in its own folder
            pipe.load_lora_weights(tmp_path / "transformer_2", load_into_transformer_2=True)
    config = next(iter(pipe.transformer.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 8)
    reloaded = FlowModel.from_pipeline(pipe)
    torch.testing.assert_close(reloaded.velocity(latents, t, cond), v_lora, atol=1e-5, rtol=0)

    fresh = FlowModel.from_pretrained(tiny_dir(kind))
    fresh.add_lora(rank=4, alpha=8)
    fresh.load_lora(tmp_path)
    torch.testing.assert_close(fresh.velocity(latents, t, cond), v_lora, atol=1e-6, rtol=0)


def test_bad_shapes_and_folders_are_clear(tiny_dir, tmp_path):
    model = FlowModel.from_pretrained(tiny_dir("sd3"))
    with pytest.raises(ConfigError, match="multiples of 4"):
        model.latent_shape(30, 32)
    with pytest.raises(ConfigError, match="folder not found"):
        FlowModel.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no model_index.json"):
        FlowModel.from_pretrained(tmp_path / "empty")
    with pytest.raises(ConfigError, match="StableDiffusionPipeline is not a flow-matching pipeline"):
        FlowModel.from_pretrained(tiny_dir("sd15"))


def test_denoising_error_is_the_velocity_mse(tiny_dir):
    model = FlowModel.from_pretrained(tiny_dir("sd3"))
    cond = model.encode_prompts(["a", "b"])
    x0, noise, sigmas = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.9])
    x_t = (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise
    v = model.transformer(hidden_states=x_t, timestep=sigmas * 1000, encoder_hidden_states=cond.embeds,
                          pooled_projections=cond.pooled).sample
    expected = ((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(model.denoising_error(x0, noise, sigmas, cond), expected, atol=1e-6, rtol=1e-5)


def test_training_sigmas_follow_the_scheduler_shift(tiny_dir):
    sd3, flux = FlowModel.from_pretrained(tiny_dir("sd3")), FlowModel.from_pretrained(tiny_dir("flux"))
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    shifted = 3.0 * u / (1 + 2.0 * u)                     # SD3's static shift 3
    torch.testing.assert_close(sd3.sample_timesteps(20000, torch.Generator().manual_seed(0)),
                               shifted.clamp(1e-3, 1.0))
    # FLUX shifts by resolution at inference only: its training sigmas are uniform
    flux_sigmas = flux.sample_timesteps(20000, torch.Generator().manual_seed(0))
    assert abs(flux_sigmas.mean().item() - 0.5) < 0.01 and sd3.sample_timesteps(20000).mean() > 0.65


def test_a_prompt_longer_than_the_text_window_is_one_warning_not_the_libraries_spam(tiny_dir, capfd):
    """The pipelines' tokenizers print a warning quoting the whole cut text for every long prompt; diffrl says
    it once per model, in one line, and encodes what the pipeline encodes (the first 77 CLIP / N T5 tokens)."""
    import warnings

    model = FlowModel.from_pretrained(tiny_dir("sd3"))
    long = "a " * 300
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cond = model.encode_prompts([long, "b " * 300])
        model.encode_prompts(["c " * 300])
    ours = [w for w in caught if "longer than" in str(w.message)]
    assert len(ours) == 1 and "302 tokens is longer than CLIPTokenizer's 77" in str(ours[0].message)
    printed = capfd.readouterr()
    assert "truncated" not in printed.err + printed.out and len(printed.err) < 500
    # the same embedding as the prompt cut to its first tokens: what the pipeline encodes
    assert torch.equal(cond.embeds[:1], model.encode_prompts(["a " * 200]).embeds)
