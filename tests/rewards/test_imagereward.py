"""ImageReward in-process: a tiny checkpoint in THUDM's own layout scored by diffrl equals a hand-written
forward of THUDM's layers (BLIP's timm ViT, med.py BERT with cross-attention, the MLP, the mean / std) on
THUDM's own preprocessing (torchvision on PIL images)."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision import transforms

from diffrl.errors import RewardError
from diffrl.models.tiny_rewards import TINY_IMAGE_REWARD_VISION, save_image_reward
from rewards import load_reward
from rewards.image.imagereward import SCORE_MEAN, SCORE_STD, blip_tokenizer

PROMPTS = ["a red cat", "two dogs on the moon, at night", "a red cat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_image_reward(tmp_path_factory.mktemp("image_reward"))


def reward(folder, **kwargs):
    options = dict(model=str(folder), tokenizer=str(folder / "tokenizer"), vision=TINY_IMAGE_REWARD_VISION)
    return load_reward("imagereward", kwargs={"imagereward": options | kwargs})


def thudm_pixels(pils, size=32):
    """ImageReward.py's _transform on PIL images."""
    transform = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    return torch.stack([transform(p.convert("RGB")) for p in pils])


def attend(q, k, v, heads, bias=None):
    b, n, d = q.shape
    split = lambda x: x.view(b, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)


def thudm_score(state, med, pixels, ids, mask):
    """BLIP's VisionTransformer, med.py's BertModel (mode multimodal) and ImageReward's MLP, written out."""
    w = lambda name: state[name]  # noqa: E731
    lin = lambda x, name: F.linear(x, w(name + ".weight"), w(name + ".bias"))  # noqa: E731
    v, heads = "blip.visual_encoder", TINY_IMAGE_REWARD_VISION["num_attention_heads"]
    x = F.conv2d(pixels, w(f"{v}.patch_embed.proj.weight"), w(f"{v}.patch_embed.proj.bias"),
                 stride=TINY_IMAGE_REWARD_VISION["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([w(f"{v}.cls_token").expand(len(x), -1, -1), x], 1) + w(f"{v}.pos_embed")
    ln6 = lambda x, name: F.layer_norm(x, x.shape[-1:], w(name + ".weight"), w(name + ".bias"), eps=1e-6)  # noqa
    for i in range(TINY_IMAGE_REWARD_VISION["num_hidden_layers"]):
        b = f"{v}.blocks.{i}"
        q, k, val = lin(ln6(x, f"{b}.norm1"), f"{b}.attn.qkv").chunk(3, dim=-1)
        x = x + lin(attend(q, k, val, heads), f"{b}.attn.proj")
        x = x + lin(F.gelu(lin(ln6(x, f"{b}.norm2"), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
    image = ln6(x, f"{v}.norm")

    t, heads = "blip.text_encoder", med["num_attention_heads"]
    ln = lambda x, name: F.layer_norm(x, x.shape[-1:], w(name + ".weight"), w(name + ".bias"), eps=1e-12)  # noqa
    h = w(f"{t}.embeddings.word_embeddings.weight")[ids] + w(f"{t}.embeddings.position_embeddings.weight")[
        :ids.shape[1]]
    h = ln(h, f"{t}.embeddings.LayerNorm")
    bias = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    for i in range(med["num_hidden_layers"]):
        b = f"{t}.encoder.layer.{i}"
        a = f"{b}.attention"
        out = attend(lin(h, f"{a}.self.query"), lin(h, f"{a}.self.key"), lin(h, f"{a}.self.value"), heads, bias)
        h = ln(lin(out, f"{a}.output.dense") + h, f"{a}.output.LayerNorm")
        c = f"{b}.crossattention"
        out = attend(lin(h, f"{c}.self.query"), lin(image, f"{c}.self.key"), lin(image, f"{c}.self.value"), heads)
        h = ln(lin(out, f"{c}.output.dense") + h, f"{c}.output.LayerNorm")
        h = ln(lin(F.gelu(lin(h, f"{b}.intermediate.dense")), f"{b}.output.dense") + h, f"{b}.output.LayerNorm")
    r = h[:, 0]
    for index in (0, 2, 4, 6, 7):  # no activations: they are commented out in ImageReward.py
        r = lin(r, f"mlp.layers.{index}")
    return ((r - SCORE_MEAN) / SCORE_STD).squeeze(-1)


@pytest.mark.parametrize("height, width", [(48, 64), (32, 47), (40, 32)])
def test_image_reward_equals_thudm_forward_on_thudm_preprocessing(folder, height, width):
    images = torch.rand(len(PROMPTS), 3, height, width, generator=torch.Generator().manual_seed(height))
    images[2] = images[0]  # the same prompt and image: the same score
    pils = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in images]
    state = load_file(str(folder / "ImageReward.safetensors"))
    med = json.loads((folder / "med_config.json").read_text())
    tokens = blip_tokenizer(str(folder / "tokenizer"))(PROMPTS, padding="max_length", truncation=True,
                                                        max_length=35, return_tensors="pt")
    assert tokens.input_ids.shape == (3, 35) and (tokens.input_ids[:, 0] == 2).all()  # [CLS] first, as THUDM's
    expected = thudm_score(state, med, thudm_pixels(pils), tokens.input_ids, tokens.attention_mask)
    scores = reward(folder)(images, PROMPTS).scores
    assert scores.shape == (3,) and scores.dtype == torch.float32
    # PIL's bicubic resize and torchvision's uint8 kernel differ by at most one level on <1% of the pixels
    # (the exact test below feeds both the same pixels); this random tiny model amplifies that to <1% of a score.
    torch.testing.assert_close(scores, expected, atol=1e-3, rtol=1e-2)
    assert scores[0] == scores[2] and scores[0] != scores[1]
    if (height, width) == (32, 47):  # odd crop margin (15): torchvision rounds the offset to 8, not 7
        from rewards.image._clip import clip_preprocess

        pixels = clip_preprocess(images, size=32, crop=(32, 32), mean=[0.48145466, 0.4578275, 0.40821073],
                                 std=[0.26862954, 0.26130258, 0.27577711], round_crop=True)
        torch.testing.assert_close(pixels, thudm_pixels(pils), atol=1e-6, rtol=0)  # float rounding only


def test_image_reward_model_equals_thudm_forward_exactly(folder):
    """Same pixels and tokens into both: the key mapping and architecture agree to float rounding."""
    from rewards.image.imagereward import ImageRewardModel, rename_checkpoint

    state = load_file(str(folder / "ImageReward.safetensors"))
    med = json.loads((folder / "med_config.json").read_text())
    model = ImageRewardModel(med, TINY_IMAGE_REWARD_VISION).eval()
    missing, _ = model.load_state_dict(rename_checkpoint(state), strict=False)
    assert [k for k in missing if not k.endswith("position_ids")] == []
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[2, 10, 11, 3, 0, 0], [2, 12, 13, 14, 15, 3]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(model(pixels, ids, mask), thudm_score(state, med, pixels, ids, mask),
                                   atol=1e-5, rtol=1e-5)


def test_image_reward_wrong_files_are_one_line_errors(folder, tmp_path):
    images = torch.rand(1, 3, 32, 32)
    with pytest.raises(RewardError, match="has no med_config.json"):
        reward(tmp_path)(images, ["a cat"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "med_config.json").write_text((folder / "med_config.json").read_text())
    state = load_file(str(folder / "ImageReward.safetensors"))
    save_file({k: v for k, v in state.items() if "blocks.1." not in k}, str(broken / "ImageReward.safetensors"))
    with pytest.raises(RewardError, match=r"does not fit ImageReward's BLIP ViT-L \(12 missing weights"):
        reward(broken, tokenizer=str(folder / "tokenizer"))(images, ["a cat"])
    with pytest.raises(RewardError, match=r"imagereward tokenizer .* give bert-base-uncased"):
        med = json.loads((folder / "med_config.json").read_text()) | {"vocab_size": 99}
        (broken / "med_config.json").write_text(json.dumps(med))
        state["blip.text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(99, 32)
        save_file(state, str(broken / "ImageReward.safetensors"))
        reward(broken, tokenizer=str(folder / "tokenizer"))(images, ["a cat"])
    with pytest.raises(RewardError, match="imagereward dtype 'fp8'"):
        reward(folder, dtype="fp8")
