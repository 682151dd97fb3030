"""FLUX.2 [dev] (Flux2Pipeline: guidance embedding, Mistral3 prompts) and FLUX.2 [klein] (Flux2KleinPipeline: Qwen3
prompts, true CFG) on tiny pipelines: the sampler equals the stock pipelines', the latent layout is the pipelines'
normalized 2x2-patch space, and the schedule is theirs."""

import math

import pytest
import torch
from diffusers import DiffusionPipeline

from diffrl.models.flow import FlowModel, detect_family
from diffrl.models.flow import flux2 as flux2_layout
from diffrl.samplers.flow import initial_noise, sample_ode

PROMPTS = ["a cat", "a red dog"]


def stock(folder):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours_and_stock(tiny_dir, kind: str, guidance: float):
    model = FlowModel.from_pretrained(tiny_dir(kind), max_sequence_length=64)
    noise = initial_noise(2, model.latent_shape(32, 32), generator=torch.Generator().manual_seed(0))
    uncond = None if model.guidance_embedded or guidance == 1.0 else model.null_condition()
    ours = model.decode(sample_ode(model, model.encode_prompts(PROMPTS), num_steps=3, height=32, width=32,
                                   guidance_scale=guidance, uncond=uncond, latents=noise.clone()))
    # The stock pipelines take the same [B, 128, H/16, W/16] noise (here [B, 16, 8, 8]) as `latents`.
    ref = stock(tiny_dir(kind))(prompt=PROMPTS, latents=noise, num_inference_steps=3, height=32, width=32,
                                guidance_scale=guidance, output_type="pt", max_sequence_length=64).images
    return ours, ref


@pytest.mark.parametrize("kind, guidance", [("flux2", 4.0), ("flux2_klein", 4.0), ("flux2_klein", 1.0)])
def test_sampling_equals_the_stock_pipeline(tiny_dir, kind, guidance):
    assert detect_family(tiny_dir(kind)) == "flux2"
    ours, ref = ours_and_stock(tiny_dir, kind, guidance)
    assert ours.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_guidance_reaches_the_model_as_an_embedding_or_as_cfg(tiny_dir):
    dev = FlowModel.from_pretrained(tiny_dir("flux2"), max_sequence_length=64)
    klein = FlowModel.from_pretrained(tiny_dir("flux2_klein"), max_sequence_length=64)
    assert dev.guidance_embedded and not klein.guidance_embedded
    x = torch.randn((2, *dev.latent_shape(32, 32)), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.8, 0.4])
    cond = dev.encode_prompts(PROMPTS)
    assert cond.embeds.shape == (2, 64, 24)  # padded to max_sequence_length; 3 stacked hidden states of width 8
    embedded = dev.velocity(x, t, cond, guidance_scale=4.0) - dev.velocity(x, t, cond, guidance_scale=1.0)
    assert embedded.abs().max() > 1e-4
    cond, uncond = klein.encode_prompts(PROMPTS), klein.null_condition()
    v_cond, v_uncond = klein.velocity(x, t, cond), klein.velocity(x, t, uncond.repeat_interleave(2))
    torch.testing.assert_close(klein.velocity(x, t, cond, guidance_scale=4.0, uncond=uncond),
                               v_uncond + 4.0 * (v_cond - v_uncond), atol=1e-5, rtol=0)
    klein.pipeline.register_to_config(is_distilled=True)  # step-distilled [klein]: guidance is ignored
    assert klein.guidance_embedded


def test_latents_are_the_pipelines_normalized_patches(tiny_dir):
    """By hand: a 2x2 patch (c, i, j) of the VAE latent becomes channel 4c + 2i + j, then each channel is
    normalized with the VAE's batch-norm running mean and sqrt(var + eps); decode inverts it exactly."""
    model = FlowModel.from_pretrained(tiny_dir("flux2_klein"), max_sequence_length=64)
    vae = model.vae
    z = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(2))
    ours = flux2_layout.from_vae(vae, z)
    mean, var, eps = vae.bn.running_mean, vae.bn.running_var, vae.config.batch_norm_eps
    assert ours.shape == (1, 16, 2, 3)
    for c, i, j, row, col in [(0, 0, 0, 0, 0), (1, 1, 0, 1, 2), (3, 1, 1, 0, 1), (2, 0, 1, 1, 0)]:
        channel = 4 * c + 2 * i + j
        expected = (z[0, c, 2 * row + i, 2 * col + j] - mean[channel]) / torch.sqrt(var[channel] + eps)
        assert ours[0, channel, row, col].item() == pytest.approx(expected.item(), abs=1e-6)
    torch.testing.assert_close(flux2_layout.to_vae(vae, ours), z, atol=1e-6, rtol=0)
    ids = flux2_layout.image_ids(2, 3, device="cpu")
    assert ids[4].tolist() == [0, 1, 1, 0]
    # integers, as the pipelines pass them: in bf16, text position 257 of a 512-token prompt would read 256
    assert flux2_layout.text_ids(512, device="cpu")[257].tolist() == [0, 0, 0, 257]


def test_schedule_shift_depends_on_the_step_count(tiny_dir):
    """FLUX.2's pipelines shift linspace(1, 1/N, N) by mu = compute_empirical_mu(tokens, N): at 64 tokens,
    mu(3 steps) != mu(10 steps), so the same resolution gets two different schedules."""
    model = FlowModel.from_pretrained(tiny_dir("flux2_klein"), max_sequence_length=64)
    shape = model.latent_shape(32, 32)
    three, ten = model.sigmas(3, shape), model.sigmas(10, shape)
    assert len(three) == 4 and three[0] == pytest.approx(1.0) and three[-1] == 0.0
    mu = flux2_layout.schedule_shift(64, 3)
    s = 2.0 / 3.0  # the second grid point of linspace(1, 1/3, 3), through the exponential shift
    assert three[1].item() == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / s - 1), rel=1e-5)
    assert flux2_layout.schedule_shift(64, 10) != pytest.approx(mu)
    assert ten[1] != three[1]
