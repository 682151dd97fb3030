import torch
from diffusers import DiffusionPipeline

from diffrl.models.unet import EpsilonModel


def test_ddim_sampling_with_cfg_equals_stock_pipeline(tiny_dir):
    model = EpsilonModel.from_pretrained(tiny_dir("sd15"))
    latents = model.sample(model.encode_prompts(["a cat", "a dog"]), num_steps=3, height=32, width=32,
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
