"""PickScore, CLIP score, aesthetic and HPS on tiny random CLIP models loaded from folders, checked against
an independent computation with the reference libraries on the same PIL images."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPModel, CLIPProcessor

from rewards import load_reward
from rewards.image.aesthetic import aesthetic_head

PROMPTS = ["a red cat", "a blue dog on the moon", "a red cat"]


def images_and_pils(height=48, width=64, n=3, seed=0):
    images = torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))
    pils = [Image.fromarray((x.permute(1, 2, 0) * 255).round().clamp(0, 255).byte().numpy()) for x in images]
    return images, pils


def reference_cosine(folder, pils, prompts):
    """The PickScore model card's way: PIL images through CLIPProcessor, then CLIPModel."""
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=pils, return_tensors="pt").pixel_values
        tokens = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        image = image if isinstance(image, torch.Tensor) else image.pooler_output
        text = text if isinstance(text, torch.Tensor) else text.pooler_output
    return model, F.normalize(image, dim=-1), F.normalize(text, dim=-1)


@pytest.mark.parametrize("height, width", [(48, 64), (32, 32), (80, 40)])
def test_pickscore_equals_clipmodel_with_clipprocessor(tiny_dir, height, width):
    images, pils = images_and_pils(height, width)
    folder = str(tiny_dir("clip"))
    reward = load_reward("pickscore", kwargs={"pickscore": {"model": folder, "processor": folder}})
    out = reward(images, PROMPTS)
    model, image, text = reference_cosine(folder, pils, PROMPTS)
    expected = model.logit_scale.exp() * (image * text).sum(-1)
    torch.testing.assert_close(out.scores, expected.float(), atol=1e-4, rtol=0)
    flow_grpo_scale = load_reward("pickscore", kwargs={"pickscore": {"model": folder, "processor": folder,
                                                                      "divide_by": 26.0}})
    torch.testing.assert_close(flow_grpo_scale(images, PROMPTS).scores, expected.float() / 26, atol=1e-5, rtol=0)


def test_clip_score_equals_reference(tiny_dir):
    images, pils = images_and_pils()
    folder = str(tiny_dir("clip"))
    out = load_reward("clip_score", kwargs={"clip_score": {"model": folder}})(images, PROMPTS)
    _, image, text = reference_cosine(folder, pils, PROMPTS)
    torch.testing.assert_close(out.scores, (100 * (image * text).sum(-1)).clamp_min(0), atol=1e-4, rtol=0)


def test_image_similarity_is_the_clip_image_cosine_to_each_input(tiny_dir, tmp_path):
    from diffrl.errors import RewardError

    images, pils = images_and_pils()
    _, inputs = images_and_pils(40, 40, seed=1)  # input images of another size, read from files
    paths = []
    for i, pil in enumerate(inputs):
        pil.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    folder = str(tiny_dir("clip"))
    reward = load_reward("image_similarity", kwargs={"image_similarity": {"model": folder}})
    out = reward(images, PROMPTS, image=paths)
    _, outputs, _ = reference_cosine(folder, pils, PROMPTS)
    _, references, _ = reference_cosine(folder, inputs, PROMPTS)
    torch.testing.assert_close(out.scores, (outputs * references).sum(-1), atol=1e-4, rtol=0)
    same = reward(images, PROMPTS, image=pils).scores  # a sample compared with itself: cosine 1
    torch.testing.assert_close(same, torch.ones(3), atol=1e-5, rtol=0)
    component = reward.components[0].reward
    with pytest.raises(RewardError, match="metadata.jsonl rows hold 'prompt' and 'image'"):
        component.check_prompts(PROMPTS)
    # image-to-video: the video reward hands each video's input image to every one of its frames
    video = torch.stack([images, images.flip(0)], dim=1)          # [3 videos, 2 frames, 3, H, W]
    lifted = load_reward("video", kwargs={"video": {"image_reward": "image_similarity", "num_frames": 2,
                                                    "image_kwargs": {"model": folder}}})
    expected = (out.scores + reward(images.flip(0), PROMPTS, image=paths).scores) / 2
    torch.testing.assert_close(lifted(video, PROMPTS, image=paths).scores, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_aesthetic_equals_reference(tiny_dir, tmp_path, suffix):
    images, pils = images_and_pils()
    folder = str(tiny_dir("clip"))
    torch.manual_seed(0)
    head = aesthetic_head(embed_dim=32).eval()
    state = {f"layers.{k}": v for k, v in head.state_dict().items()}  # the published file's key names
    path = tmp_path / f"head{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    reward = load_reward("aesthetic", kwargs={"aesthetic": {"model": folder, "head": str(path)}})
    out = reward(images, PROMPTS)
    _, image, _ = reference_cosine(folder, pils, PROMPTS)
    with torch.no_grad():
        expected = head(image).squeeze(-1)
    torch.testing.assert_close(out.scores, expected, atol=1e-4, rtol=0)


def test_weights_load_lazily(tiny_dir):
    folder = str(tiny_dir("clip"))
    reward = load_reward("pickscore", kwargs={"pickscore": {"model": folder, "processor": folder}})
    component = reward.components[0].reward
    assert component.clip.model is None  # nothing loaded by construction
    reward(images_and_pils(n=1)[0], ["x"])
    assert component.clip.model is not None


def test_hps_equals_open_clip_reference(tmp_path):
    import open_clip  # the clip extra, installed by make

    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                              "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**config).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "hps.pt")
    images, pils = images_and_pils(32, 32)  # at the model's size, so open_clip's PIL resize is the identity
    reward = load_reward("hps", kwargs={"hps": {"checkpoint": str(tmp_path / "hps.pt"), "model_config": config}})
    out = reward(images, PROMPTS)
    preprocess = open_clip.image_transform(32, is_train=False)
    tokenizer = open_clip.SimpleTokenizer(context_length=77)
    with torch.no_grad():
        image = F.normalize(model.encode_image(torch.stack([preprocess(p) for p in pils])), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
    torch.testing.assert_close(out.scores, (image * text).sum(-1), atol=1e-5, rtol=0)
