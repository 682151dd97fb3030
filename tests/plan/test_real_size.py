"""A real-size trace in the suite: SD3.5-Medium (transformer, VAE, CLIP-L, CLIP-bigG, T5-XXL: 7.9B parameters)
through AWM's OCR config, one prompt of 6 samples, under fake tensors in well under a minute."""

from diffrl.plan.memory import CATEGORIES
from diffrl.plan.trace import trace_step

GIB = 2 ** 30


def test_sd35_medium_awm_step_at_full_size():
    trace = trace_step("configs/awm/sd35m_ocr.yaml", [], prompts=1, group=6)
    # the pipeline's parameters, every one of them built: bf16, 2 bytes each, except what stays in fp32 (the
    # VAE) and the buffers
    assert 7.9e9 < trace.total_params < 8.0e9
    update = trace.phases["update"]
    assert trace.total_params * 2 < update.split["weights"] < trace.total_params * 2 * 1.04
    # LoRA r 32 on the attention projections: 18.7M trained parameters in the model's 16-bit dtype, and their
    # two AdamW moments in it (plus a 4-byte step count per tensor)
    assert trace.trained_params == 18_677_760
    assert 0 <= update.split["optimizer"] - 2 * 2 * trace.trained_params < 10_000
    # the micro-batch of 3 runs its 6 timesteps as one batch of 18 (the public code's layout): activations
    # are most of the step; a regression value of this trace (fake tensors are deterministic)
    assert 30 < update.split["activations"] / GIB < 36 and 48 < update.peak_bytes / GIB < 53
    assert sum(update.split[c] for c in CATEGORIES) == update.peak_bytes
    assert trace.phases["rollout"].flops > 100e12 and update.flops > trace.phases["rollout"].flops
