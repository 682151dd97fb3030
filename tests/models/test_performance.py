"""The speed switches (model.attention, model.compile, mixed_precision, tf32) give the default's results up to
floating-point rounding, on the tiny models, on CPU."""

import pytest
import torch

from diffrl.dllm.masked_lm import MaskedDiffusionLM
from diffrl.errors import ConfigError
from diffrl.models import performance
from diffrl.models.flow import FlowModel
from diffrl.trainers import get_trainer, load_config


def _velocity(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, *model.latent_shape(32, 32, 1), generator=g)
    cond = model.encode_prompts(["a red circle", "a blue square"])
    return model.velocity(latents, torch.tensor([0.7, 0.3]), cond)


def test_language_model_attention_kernels_agree(tiny_dir):
    model = MaskedDiffusionLM.from_pretrained(tiny_dir("dllm"))
    ids = torch.randint(5, 90, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sdpa = model.logits(ids)
        performance.set_attention(model.module, "eager")
        assert model.module.config._attn_implementation == "eager"
        eager = model.logits(ids)
    assert not torch.equal(sdpa, eager)                        # another kernel really ran ...
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)  # ... with the same result
    with pytest.raises(ConfigError, match="'flash' is not a transformers attn_implementation; use one of sdpa"):
        performance.set_attention(model.module, "flash")


def test_diffusers_attention_backends_agree(tiny_dir):
    model = FlowModel.from_pretrained(tiny_dir("sd3"))
    with torch.no_grad():
        native = _velocity(model)
        performance.set_attention(model.transformer, "_native_math")  # SDPA's reference math kernel
        math = _velocity(model)
    torch.testing.assert_close(math, native, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="'flashy' is not a diffusers attention backend; use one of flash"):
        performance.set_attention(model.transformer, "flashy")


def test_compiled_module_gives_the_same_loss_and_gradients(tiny_dir):
    """torch.compile through the config switch (backend aot_eager: dynamo's graph capture and AOTAutograd, without
    inductor's C++ code generation, which takes ~40 s on CPU; inductor was checked by hand: max |dlogits| 1e-7)."""
    config = load_config("configs/igpo/tiny_arithmetic.yaml", ["model.compile=true", "model.compile_backend=aot_eager"])
    eager, compiled = (MaskedDiffusionLM.from_pretrained(tiny_dir("dllm")) for _ in range(2))
    performance.compile_trained(compiled.module, config.model)
    ids = torch.randint(5, 90, (3, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in (eager, compiled):
        loss = model.logits(ids).logsumexp(-1).mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    for (name, a), (_, b) in zip(eager.module.named_parameters(), compiled.module.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_trainers_compile_the_trained_module_after_prepare(tiny_dir, tmp_path):
    config = load_config("configs/awm/tiny_sd3_jpeg.yaml", [
        f"model.path={tiny_dir('sd3')}", f"output_dir={tmp_path}", "model.compile=true",
        "model.compile_backend=aot_eager", "model.attention=_native_math", "data.eval_size=0",
        "logging.progress_bar=false", "logging.trackers=[]"])
    trainer = get_trainer("awm").trainer_class(config)
    trainer.setup()
    assert trainer.model.transformer._compiled_call_impl is not None
    assert {type(p).__name__ for p in trainer.model.transformer.attn_processors.values()}  # still a transformer


def test_bf16_mixed_precision_matches_float32_to_bf16_rounding(tiny_dir):
    """mixed_precision=bf16 is accelerate's autocast around the forward passes: the same autocast here (one
    process cannot hold two Accelerators of different precision)."""
    model = FlowModel.from_pretrained(tiny_dir("sd3"))
    with torch.no_grad():
        full = _velocity(model)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            mixed = _velocity(model)
    assert not torch.equal(mixed.float(), full)                     # bf16 matmuls really ran ...
    error = float((mixed.float() - full).norm() / full.norm())
    assert error < 2e-2, error                                      # ... within bf16's rounding (2^-8)


def test_tf32_switch_sets_gpu_matmul_precision_and_leaves_cpu_math_alone():
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    a, b = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), torch.randn(64, 64)
    expected = a @ b
    try:
        performance.set_tf32(True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert torch.equal(a @ b, expected)
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


@pytest.mark.parametrize("kind", ["dllm", "diffusion_gemma"])
def test_gradient_checkpointing_lowers_a_lora_update_and_keeps_its_gradients(tiny_dir, kind):
    """Checkpointing a LoRA language model holds less at the update's peak than not checkpointing (with
    transformers' input-embedding hook left on it held more: 10.0 MB against 6.0 MB on the tiny DiffusionGemma),
    for the same gradients."""
    from diffrl.dllm.diffusion_gemma import DiffusionGemmaLM
    from diffrl.plan.memory import LiveMemory

    kind_class = DiffusionGemmaLM if kind == "diffusion_gemma" else MaskedDiffusionLM
    g = torch.Generator().manual_seed(0)
    prompt, answer = torch.randint(5, 50, (8, 16), generator=g), torch.randint(5, 50, (8, 32), generator=g)
    peaks, grads = [], []
    for checkpointing in (False, True):
        model = kind_class.from_pretrained(tiny_dir(kind))
        torch.manual_seed(0)   # the adapters start alike
        model.add_lora(rank=4, alpha=8, init="gaussian")
        if checkpointing:
            performance.enable_gradient_checkpointing(model.module)
            assert model.module.is_activation_checkpointing
        model.module.train()
        with LiveMemory() as memory, memory.phase("update"):
            log_probs, _ = model.completion_log_probs(prompt, torch.ones_like(prompt), answer, mask_seed=1,
                                                      prompt_mask_prob=0.0)
            log_probs.mean().backward()
        peaks.append(memory.peaks["update"].bytes)
        grads.append({n: p.grad for n, p in model.module.named_parameters() if p.requires_grad})
    assert peaks[1] < 0.8 * peaks[0], peaks
    assert all(g.abs().sum() > 0 for n, g in grads[0].items() if "lora_B" in n)  # A gets none while B is 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)
