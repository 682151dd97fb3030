"""GenEval: the benchmark's rules on hand-built detections (the spec's worked scores), the detector's
post-processing on hand-made logits, and the reward end to end on a tiny Mask2Former whose output is known
(every query a full-image dog) with a tiny CLIP for colours, loaded from folders as a user loads hub ids."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, Mask2FormerForUniversalSegmentation

from diffrl.errors import RewardError
from rewards import load_reward
from rewards.image.geneval import GenEval, detector_input, instances
from rewards.image.geneval_rules import (
    CLASSES,
    Detection,
    benchmark_correct,
    keep_detections,
    relative_position,
    reward_terms,
)


def box(x1, y1, x2, y2, score=0.95):
    return Detection((x1, y1, x2, y2), score)


def no_colors(name, objects):
    raise AssertionError("colour asked for where the rules need none")


def colored(*names):
    """A colour classifier whose answers are known: the i-th object asked about gets names[i]."""
    return lambda name, objects: list(names[:len(objects)])


DOG, CAT = {"class": "dog", "count": 1}, {"class": "cat", "count": 1}


def score(detected, meta, colors=no_colors):
    terms, strict = reward_terms(detected, meta, colors)
    return sum(terms) / len(terms) if terms else 0.0, strict


def test_partial_credit_matches_the_worked_examples():
    one_dog, one_cat = {"dog": [box(0, 0, 10, 10)]}, {"cat": [box(20, 0, 30, 10)]}
    # colours: perfect, and one wrong in a two-object colour prompt
    assert score(one_dog, {"include": [{**DOG, "color": "red"}]}, colored("red")) == (1.0, True)
    color_attr = {"include": [{**DOG, "color": "red"}, {**CAT, "color": "blue"}]}
    assert score({**one_dog, **one_cat}, color_attr, colored("red", "green"))[0] == pytest.approx(0.75)
    # one object missing: [0, 0, 1, 1]
    assert score(one_cat, color_attr, colored("blue")) == (0.5, False)
    # "two wine glasses": 3 found -> .5, 4 found -> 0
    glasses = {"tag": "counting", "include": [{"class": "wine glass", "count": 2}]}
    assert score({"wine glass": [box(0, 0, 5, 5)] * 3}, glasses)[0] == 0.5
    assert score({"wine glass": [box(0, 0, 5, 5)] * 4}, glasses)[0] == 0.0
    # positions: perfect, wrong relation ([1, 1, 0, 1]), target missing ([0, 1, 0])
    position = {"include": [CAT, {**DOG, "position": ["left of", 0]}]}
    assert score({**one_dog, **one_cat}, position) == (1.0, True)
    assert score({"dog": [box(40, 0, 50, 10)], **one_cat}, position) == (0.75, False)
    assert score(one_dog, position) == (pytest.approx(1 / 3), False)
    # one object asked for, three found: -1; nothing asked: 0
    assert score({"dog": [box(0, 0, 5, 5)] * 3}, {"include": [DOG]}) == (-1.0, False)
    assert score(one_dog, {"include": []}) == (0.0, True)


def test_benchmark_verdict_uses_the_most_confident_objects_and_the_exclude_clause():
    # the benchmark asks for at least `count` (top-count checked); the reward for exactly `count`
    three = {"dog": [box(0, 0, 5, 5, 0.9), box(10, 0, 15, 5, 0.8), box(20, 0, 25, 5, 0.7)]}
    assert benchmark_correct(three, {"include": [DOG]}, no_colors)
    assert not reward_terms(three, {"include": [DOG]}, no_colors)[1]
    counting = {"include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}]}
    assert not benchmark_correct(three, counting, no_colors)
    assert benchmark_correct({"dog": three["dog"][:2]}, counting, no_colors)
    # colour on the top object only
    assert benchmark_correct(three, {"include": [{**DOG, "color": "red"}]}, colored("red"))
    assert not benchmark_correct(three, {"include": [{**DOG, "color": "red"}]}, colored("blue"))


def test_thresholds_sorting_and_the_object_limit():
    found = {"dog": [box(0, 0, 1, 1, s) for s in (0.31, 0.95, 0.3, 0.5)], "cat": [box(0, 0, 1, 1, 0.2)]}
    kept = keep_detections(found, "two_object")
    assert [d.score for d in kept["dog"]] == [0.95, 0.5, 0.31] and "cat" not in kept   # strictly above 0.3
    assert [d.score for d in keep_detections(found, "counting")["dog"]] == [0.95]        # 0.9 for counting
    many = keep_detections({"dog": [box(0, 0, 1, 1, 0.5 + i / 100) for i in range(20)]}, "single_object")
    assert len(many["dog"]) == 16 and many["dog"][0].score == 0.69


def test_relative_position_by_hand():
    a, b = box(0, 0, 10, 10), box(20, 0, 30, 10)
    # off = (-20, 0); margin 0.1 * (10 + 10) = 2 -> rev x = -18, dx = -0.9
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    assert relative_position(box(0, 0, 10, 10), box(0, 30, 10, 40)) == {"above"}
    assert relative_position(box(0, 0, 10, 10), box(30, 30, 40, 40)) == {"left of", "above"}   # diagonal
    assert relative_position(a, box(1, 0, 11, 10)) == set()       # within the margin: no relation
    assert relative_position(a, a) == set()


def test_instances_by_hand():
    # 2 queries, 80 classes + no-object; masks already at the image size (the interpolations are identities)
    class_logits = torch.full((2, 81), -30.0)
    class_logits[0, CLASSES.index("dog")] = 0.0
    class_logits[0, 80] = 0.0                       # p(dog) = 1/2 for query 0
    class_logits[1, CLASSES.index("cat")] = 5.0     # p(cat) ~ 1 for query 1
    mask_logits = torch.full((2, 6, 8), -4.0)
    mask_logits[0, 1:3, 2:5] = 2.0                  # rows 1-2, columns 2-4
    found = instances(class_logits, mask_logits, padded=(6, 8), resized=(6, 8), original=(6, 8), top_k=2)
    dog, cat = found["dog"][0], found["cat"][0]
    assert dog.box == (2.0, 1.0, 5.0, 3.0)                                  # exclusive right / bottom
    assert dog.score == pytest.approx(0.5 * torch.sigmoid(torch.tensor(2.0)).item(), rel=1e-5)
    assert dog.mask.sum() == 6 and cat.box == (0.0, 0.0, 0.0, 0.0) and cat.score == 0.0   # an empty mask
    assert set(found) == {"dog", "cat"}


def test_detector_input_resizes_normalizes_and_pads():
    image = torch.full((1, 3, 20, 10), 0.5)
    pixels, resized = detector_input(image, size=(1333, 800), bgr=False)
    # scale = min(1333 / 20, 800 / 10) = 66.65 -> 1333 x 667, padded to 1344 x 672
    assert resized == (1333, 667) and pixels.shape == (1, 3, 1344, 672)
    expected = (128 - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])
    torch.testing.assert_close(pixels[0, :, 0, 0], expected)
    assert pixels[0, :, 1333:].abs().max() == 0 and pixels[0, :, :, 667:].abs().max() == 0
    red = torch.zeros(1, 3, 32, 32)
    red[:, 0] = 1.0
    rgb, _ = detector_input(red, size=(64, 64), bgr=False)
    bgr, _ = detector_input(red, size=(64, 64), bgr=True)
    assert rgb[0, 0, 0, 0] > 0 > bgr[0, 0, 0, 0]        # the public training rewards' swapped channels


@pytest.fixture(scope="module")
def all_dogs(tiny_dir, tmp_path_factory):
    """The tiny Mask2Former rewired so that every query is a dog covering the whole image: p(dog) ~ 1 and a
    constant mask logit 3.2 (score sigmoid(3.2) = 0.961)."""
    model = Mask2FormerForUniversalSegmentation.from_pretrained(tiny_dir("mask2former"))
    with torch.no_grad():
        head = model.class_predictor
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[CLASSES.index("dog")] = 10.0
        projection = model.model.pixel_level_module.decoder.mask_projection
        projection.weight.zero_()
        projection.bias.fill_(0.1)
        last = model.get_submodule("model.transformer_module.decoder.mask_predictor.mask_embedder.2.0")
        last.weight.zero_()
        last.bias.fill_(1.0)
    folder = tmp_path_factory.mktemp("all_dogs")
    model.save_pretrained(folder)
    return str(folder)


def hand_colors(clip_folder, image):
    """CLIP colour of a full-image object by the benchmark's recipe, through CLIPProcessor on a PIL image."""
    from rewards.image.geneval_rules import COLORS

    model, processor = CLIPModel.from_pretrained(clip_folder).eval(), CLIPProcessor.from_pretrained(clip_folder)
    pil = Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy())
    texts = [t.format(c=c) for c in COLORS for t in ("a photo of a {c} dog", "a photo of a {c}-colored dog",
                                                      "a photo of a {c} object")]
    with torch.no_grad():
        img = model.get_image_features(**processor(images=[pil], return_tensors="pt"))
        txt = model.get_text_features(**processor(text=texts, padding=True, return_tensors="pt"))
    img = F.normalize(getattr(img, "pooler_output", img), dim=-1)
    txt = F.normalize(F.normalize(getattr(txt, "pooler_output", txt), dim=-1).view(10, 3, -1).mean(1), dim=-1)
    return COLORS[int((img @ txt.T).argmax())]


def test_geneval_end_to_end_on_a_known_detector(all_dogs, tiny_dir):
    clip = str(tiny_dir("clip"))
    reward = load_reward("geneval", kwargs={"geneval": {"detector": all_dogs, "clip": clip}})
    images = torch.rand(5, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    color = hand_colors(clip, images[3])
    meta = {"tag": ["single_object", "two_object", "counting", "colors", "colors"],
            "include": [[DOG], [DOG, CAT], [{"class": "dog", "count": 8}], [{**DOG, "color": color}],
                        [{"class": "dog", "count": 8, "color": color}]],
            "exclude": [None, None, [{"class": "dog", "count": 9}], None, None]}
    out = reward(images, ["p"] * 5, **meta)
    # 8 full-image dogs at 0.961 in every image (the 8 queries; other pairs score ~0)
    detected = reward.components[0].reward.detect(images[:1], ["counting"])[0]
    assert list(detected) == ["dog"] and len(detected["dog"]) == 8
    assert detected["dog"][0].box == (0.0, 0.0, 64.0, 48.0)
    assert detected["dog"][0].score == pytest.approx(torch.sigmoid(torch.tensor(3.2)).item(), abs=1e-3)
    # partial: 1 - 7 = -6; (-6 + 0) / 2; exact count 8; count wrong + colour -> [-6, 0]; count and colour
    # right for the top object at least (the others are the same image, so the same colour) -> 1
    torch.testing.assert_close(out.scores, torch.tensor([-6.0, -3.0, 1.0, -3.0, 1.0]))
    assert out.extras["geneval/correct"].tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]
    assert out.extras["geneval/strict"].tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]
    benchmark = load_reward("geneval", kwargs={"geneval": {"detector": all_dogs, "clip": clip,
                                                           "score": "benchmark"}})
    assert benchmark(images, ["p"] * 5, **meta).scores.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]


def test_geneval_needs_metadata_and_a_coco_detector(all_dogs, tiny_dir, tmp_path):
    reward = load_reward("geneval", kwargs={"geneval": {"detector": all_dogs, "clip": str(tiny_dir("clip"))}})
    with pytest.raises(RewardError, match="needs each prompt's GenEval metadata"):
        reward(torch.rand(1, 3, 32, 32), ["a photo of a dog"])
    with pytest.raises(RewardError, match="'unicorn' is not one of the 80 COCO classes"):
        reward(torch.rand(1, 3, 32, 32), ["x"], tag=["single_object"], include=[[{"class": "unicorn", "count": 1}]])
    model = Mask2FormerForUniversalSegmentation.from_pretrained(all_dogs)
    model.config.num_labels = 3
    model.config.id2label = {0: "a", 1: "b", 2: "c"}
    small = Mask2FormerForUniversalSegmentation(model.config)
    small.save_pretrained(tmp_path / "three")
    wrong = GenEval(detector=str(tmp_path / "three"), clip=str(tiny_dir("clip")))
    with pytest.raises(RewardError, match="has 3 classes; it needs a COCO instance-segmentation checkpoint"):
        wrong(torch.rand(1, 3, 32, 32), ["x"], tag=["single_object"], include=[[DOG]])


def test_diffrl_score_prints_the_per_tag_table(all_dogs, tiny_dir, tmp_path, capsys):
    from diffrl import cli

    rows = []
    for i, (tag, include) in enumerate([("single_object", [DOG]), ("two_object", [DOG, CAT]),
                                        ("counting", [{"class": "dog", "count": 8}])]):
        Image.new("RGB", (40, 32), (30 * i, 90, 200)).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "prompt": f"prompt {i}", "tag": tag, "include": include})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kwargs = json.dumps({"geneval": {"detector": all_dogs, "clip": str(tiny_dir("clip"))}})
    assert cli.main(["score", "--reward", "geneval", "--images", str(tmp_path), "--reward-kwargs", kwargs,
                     "--quiet", "--out", str(tmp_path / "scores.jsonl")]) == 0
    out = capsys.readouterr().out
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()}
    assert table["single_object"][:2] == ["1", "1.0000"] and table["two_object"][:2] == ["1", "0.0000"]
    assert table["counting"][:3] == ["1", "1.0000", "1.0000"]
    assert table["overall"][:2] == ["3", "0.6667"]                       # mean over the three tags
    written = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["geneval"] for r in written] == [-6.0, -3.0, 1.0] and written[2]["geneval/tag"] == "counting"


def test_generated_prompts_follow_the_templates_and_are_valid_metadata():
    from rewards.image.geneval_prompts import geneval_prompts, plural
    from rewards.image.geneval_rules import TAGS, check_metadata

    rows = geneval_prompts(10, seed=3)
    assert [r["tag"] for r in rows] == [t for t in TAGS for _ in range(10)]
    assert len({r["prompt"] for r in rows}) == 60
    for row in rows:
        check_metadata(row, "generated")
        first = row["include"][0]
        if row["tag"] == "counting":
            n = first["count"]
            assert row["exclude"] == [{"class": first["class"], "count": n + 1}]
            assert row["prompt"] == f"a photo of {['two', 'three', 'four'][n - 2]} {plural(first['class'])}"
        if row["tag"] == "position":
            b, a = row["include"]
            article = "an" if b["class"][0] in "aeiou" else "a"
            assert row["prompt"].endswith(f"{a['position'][0]} {article} {b['class']}")
        if row["tag"] in ("colors", "color_attr"):
            assert all(c["class"] != "person" and c["color"] in row["prompt"] for c in row["include"])
    assert geneval_prompts(10, seed=3) == rows                             # seeded
    assert len([r for r in geneval_prompts(100, seed=0) if r["tag"] == "single_object"]) == 80   # every class
    held_out = {r["prompt"] for r in rows}
    assert not held_out & {r["prompt"] for r in geneval_prompts(30, seed=4, exclude=held_out)}
    assert [plural(w) for w in ("person", "bus", "knife", "sheep", "wine glass", "couch")] == \
        ["people", "buses", "knives", "sheep", "wine glasses", "couches"]


def test_an_error_in_the_background_scorer_reaches_the_trainer_as_is():
    from diffrl.training.reward_pipeline import RolloutScorer

    reward = load_reward("geneval", kwargs={"geneval": {"detector": "unused", "clip": "unused"}})
    for overlap in (False, True):
        scorer = RolloutScorer(reward, overlap=overlap)
        scorer.add(torch.rand(2, 3, 8, 8), ["a", "b"], [{}, {}])
        with pytest.raises(RewardError, match="needs each prompt's GenEval metadata"):
            scorer.result()
