import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForMaskedLM

from diffrl.dllm.masked_lm import MaskedDiffusionLM
from diffrl.errors import ConfigError


def test_loads_from_folder_with_mask_token_and_chat_template(tiny_dir):
    model = MaskedDiffusionLM.from_pretrained(tiny_dir("dllm"))
    assert model.mask_id == model.tokenizer.convert_tokens_to_ids("<|mdm_mask|>") == 4
    (ids,) = model.chat_prompt_ids(["1+2"])
    assert model.tokenizer.decode(ids) == "<|user|>1+2<|assistant|>"
    padded, mask = model.left_pad([[7, 8, 9], [5]])
    assert padded.tolist() == [[7, 8, 9], [0, 0, 5]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert model.logits(padded, mask).shape == (2, 3, len(model.tokenizer))


def test_attention_is_bidirectional(tiny_dir):
    """Changing the last token changes the first position's logits: no causal mask."""
    model = MaskedDiffusionLM.from_pretrained(tiny_dir("dllm"))
    a = torch.tensor([[10, 11, 12, 13]])
    b = torch.tensor([[10, 11, 12, 40]])
    assert (model.logits(a)[0, 0] - model.logits(b)[0, 0]).abs().max() > 1e-4


def test_lora_saves_in_peft_format(tiny_dir, tmp_path):
    model = MaskedDiffusionLM.from_pretrained(tiny_dir("dllm"))
    x = torch.randint(5, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    base = model.logits(x)
    model.add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.module.named_parameters():
            if "lora_B" in name:
                p.normal_()
    tuned = model.logits(x)
    with model.reference():
        torch.testing.assert_close(model.logits(x), base)
    assert (tuned - base).abs().max() > 1e-3
    model.save_lora(tmp_path)
    peft_model = PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(tiny_dir("dllm")), tmp_path)
    torch.testing.assert_close(peft_model(input_ids=x).logits, tuned, atol=1e-5, rtol=0)


def test_missing_mask_token_is_a_clear_error(tiny_dir):
    model = MaskedDiffusionLM.from_pretrained(tiny_dir("dllm"))
    model.tokenizer.mask_token = None
    model.module.config.mask_token_id = None
    with pytest.raises(ConfigError, match="cannot find the mask token"):
        MaskedDiffusionLM(model.module, model.tokenizer)


def test_a_prompt_longer_than_the_model_s_positions_is_one_warning(tiny_dir):
    import warnings

    from diffrl.dllm.masked_lm import MaskedDiffusionLM

    model = MaskedDiffusionLM.from_pretrained(tiny_dir("dllm"))
    window = model.module.config.max_position_embeddings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.chat_prompt_ids(["1+2", "9" * (window + 50)])
        model.chat_prompt_ids(["8" * (window + 50)])
    ours = [str(w.message) for w in caught if "positions" in str(w.message)]
    assert len(ours) == 1 and f"longer than the {window} positions" in ours[0]
