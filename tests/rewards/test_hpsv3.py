"""HPSv3 in-process: a tiny Qwen2-VL checkpoint in HPSv3's released layout (transformers 4.45 names, the
vocabulary grown by <|Reward|>) scored by diffrl equals HPSv3's inference written out here: qwen_vl_utils'
resize, Qwen2-VL-Instruct's rendered prompt, the decoder called with sequential positions, the head on the
reward token, mu."""

import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from diffrl.errors import RewardError
from diffrl.models.tiny_rewards import save_hpsv3
from rewards import load_reward
from rewards.image.hpsv3 import INSTRUCTION, PIXELS, PROMPT_WITH_SPECIAL_TOKEN, qwen_resize

PROMPTS = ["a red cat", "two dogs on the moon, at night", "a red cat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_hpsv3(tmp_path_factory.mktemp("hpsv3"))


def reward(folder, **kwargs):
    options = dict(checkpoint=str(folder / "HPSv3.safetensors"), base=str(folder / "base"), dtype="float32")
    return load_reward("hpsv3", kwargs={"hpsv3": options | kwargs})


def hpsv3_reference(folder, pils, prompts):
    """HPSv3's inferencer: processor with <|Reward|>, 4.45 keys mapped as its ports map them, the decoder with
    position_ids=None (sequential), rm_head on the reward token, mu."""
    processor = AutoProcessor.from_pretrained(folder / "base", padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    token = processor.tokenizer.convert_tokens_to_ids("<|Reward|>")
    state = load_file(str(folder / "HPSv3.safetensors"))
    head = {k: v for k, v in state.items() if k.startswith("rm_head.")}
    mapped = {re.sub(r"^model(?!\.(language_model|visual))", "model.language_model",
                     re.sub(r"^visual", "model.visual", k)): v for k, v in state.items() if k not in head}
    config = AutoConfig.from_pretrained(folder / "base")
    config.text_config.vocab_size = config.vocab_size = len(processor.tokenizer)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.load_state_dict(mapped, strict=True)
    texts = ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
             "<|vision_start|><|image_pad|><|vision_end|>" + INSTRUCTION.format(text_prompt=p)
             + PROMPT_WITH_SPECIAL_TOKEN + "<|im_end|>\n<|im_start|>assistant\n" for p in prompts]
    resized = []
    for pil in pils:
        h, w = smart_resize(pil.height, pil.width, factor=28, min_pixels=PIXELS, max_pixels=PIXELS)
        resized.append(pil.resize((w, h)))  # qwen_vl_utils: PIL's default (bicubic)
    batch = processor(text=texts, images=resized, padding=True, return_tensors="pt")
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(batch.input_ids)
        images = torch.cat(model.model.get_image_features(batch.pixel_values, batch.image_grid_thw).pooler_output)
        mask = (batch.input_ids == config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, images)
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
        x = hidden[batch.input_ids == token].float()
        x = torch.relu(x @ head["rm_head.0.weight"].T + head["rm_head.0.bias"])
        x = torch.relu(x @ head["rm_head.3.weight"].T + head["rm_head.3.bias"])
        return (x @ head["rm_head.5.weight"].T + head["rm_head.5.bias"])[:, 0]


@pytest.mark.parametrize("height, width", [(48, 64), (448, 448)])
def test_hpsv3_equals_hpsv3_inference_written_out(folder, height, width):
    images = torch.rand(len(PROMPTS), 3, height, width, generator=torch.Generator().manual_seed(height))
    images[2] = images[0]
    pils = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in images]
    scores = reward(folder, batch_size=2)(images, PROMPTS).scores   # two batches, right padding in the first
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, hpsv3_reference(folder, pils, PROMPTS), atol=1e-5, rtol=1e-4)
    assert abs(scores[0] - scores[2]) < 1e-5 and scores[0] != scores[1]


@pytest.mark.parametrize("height, width", [(48, 64), (448, 448), (1000, 30), (30, 7), (700, 1300), (512, 512)])
def test_qwen_resize_is_smart_resize_at_a_fixed_budget(height, width):
    assert qwen_resize(height, width) == smart_resize(height, width, 28, PIXELS, PIXELS)


def test_hpsv3_bad_settings_are_one_line_errors(folder, tmp_path, tiny_dir):
    images = torch.rand(1, 3, 32, 32)
    with pytest.raises(RewardError, match=r"exactly one <\|Reward\|> token"):
        reward(folder)(images, ["a cat <|Reward|>"])
    with pytest.raises(RewardError, match="is a clip model; HPSv3 is trained on Qwen2-VL"):
        reward(folder, base=str(tiny_dir("clip")))(images, ["a cat"])
    state = load_file(str(folder / "HPSv3.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("rm_head.")}, str(tmp_path / "no_head.safetensors"))
    with pytest.raises(RewardError, match="no reward head"):
        reward(folder, checkpoint=str(tmp_path / "no_head.safetensors"))(images, ["a cat"])
    save_file({k: v for k, v in state.items() if ".layers.1." not in k}, str(tmp_path / "short.safetensors"))
    with pytest.raises(RewardError, match=r"does not fit .* \(\d+ missing weights such as"):
        reward(folder, checkpoint=str(tmp_path / "short.safetensors"))(images, ["a cat"])
    with pytest.raises(RewardError, match="hpsv3 dtype 'fp8'"):
        reward(folder, dtype="fp8")


def test_hpsv3_in_bfloat16_keeps_the_head_s_float32_weights(folder):
    from rewards.image.hpsv3 import HPSv3

    reward = HPSv3(checkpoint=str(folder / "HPSv3.safetensors"), base=str(folder / "base"))   # bf16 default
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    scores = reward(images, PROMPTS[:2]).scores
    state = load_file(str(folder / "HPSv3.safetensors"))
    assert reward.model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(reward.model.rm_head[0].weight, state["rm_head.0.weight"])   # not rounded through bf16
    pils = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in images]
    torch.testing.assert_close(scores, hpsv3_reference(folder, pils, PROMPTS[:2]), atol=0.05, rtol=0.05)
