"""Fidelity of IGPO / diffu-GRPO and Diffusion-DPO to their public codes: expected values derived by hand."""

import json
import random

import pytest
import torch
import yaml

from diffrl.data import ReasoningExample, load_reasoning, split_trace_answer
from diffrl.dllm.hints import build_spacing_scaled_hints, hint_text
from diffrl.dllm.masked_sampler import FREE
from diffrl.dllm.reasoning import until_first
from diffrl.losses import kl_penalty
from diffrl.trainers import load_config
from rewards import load_reward
from rewards.text.format import format_score
from rewards.text.math import answers_match, extract_answer
from tests.conftest import REPO_ROOT

# ----------------------------------------------------------------------------------------------------------
# IGPO hints
# ----------------------------------------------------------------------------------------------------------


def test_spacing_scaled_hint_layout_by_hand():
    """Trace 100..121 (22 tokens), canvas 40, free tail 10 -> area 30, stretch s = 30 / 22 = 1.36.

    random.Random(0).randint(4, 6) gives 5, 5, 4, 5, then 6 > the 3 tokens left: chunks (0,5) (5,10) (10,14)
    (14,19); 119..121 are no chunk. ratio 0.5 hides int(4 * 0.5) = 2 chunks; rng.sample picks (14,19) and
    (5,10), but the last chunk is always shown: revealed (0,5) (10,14) (14,19). Placement: int(0 s) = 0;
    5 + min(int(5 s) = 6, 100) = 11; 15 + int(0 s) = 15.
    """
    pinned = build_spacing_scaled_hints(list(range(100, 122)), 40, ratio=0.5, min_chunk=4, max_chunk=6,
                                        rng=random.Random(0), free_tail=10, max_spacing=100)
    expected = [FREE] * 40
    expected[0:5] = range(100, 105)
    expected[11:15] = range(110, 114)
    expected[15:20] = range(114, 119)
    assert pinned.tolist() == expected


def test_spacing_scaled_hints_cap_the_gap_and_keep_the_tail_free():
    """A short trace in a long canvas stretches at most 1.5x; max_spacing caps a gap; nothing lands in the
    free tail; ratio 0 gives no hint at all."""
    trace = list(range(10, 30))                     # 20 tokens, area 226: s = min(1.5, 226 / 20) = 1.5
    for seed in range(20):
        pinned = build_spacing_scaled_hints(trace, 256, ratio=0.6, min_chunk=5, max_chunk=10,
                                            rng=random.Random(seed))
        assert (pinned[226:] == FREE).all()
        hinted = pinned[pinned != FREE].tolist()
        assert hinted == sorted(hinted) and hinted          # chunks keep their order
        assert pinned.tolist().index(hinted[-1]) < 30       # stretched by 1.5 at most
    capped = build_spacing_scaled_hints(list(range(100, 200)), 200, ratio=0.5, min_chunk=5, max_chunk=5,
                                        rng=random.Random(1), free_tail=0, max_spacing=2)
    positions = (capped != FREE).nonzero().flatten().tolist()
    runs = [p for p, q in zip(positions, positions[1:]) if q - p > 1]
    assert all(q - p <= 3 for p, q in zip(positions, positions[1:]))   # gaps of at most max_spacing = 2
    assert runs  # some chunks were hidden
    assert (build_spacing_scaled_hints(trace, 64, ratio=0.0, min_chunk=5, max_chunk=10,
                                       rng=random.Random(0)) == FREE).all()


def test_hint_text_is_igpo_reasoning_plus_the_response():
    example = ReasoningExample("q", "2 + 3 = 5", "5", solution="2 + 3 = 5\nThe answer is: 5")
    assert hint_text(example, "igpo") == "<reasoning>\n2 + 3 = 5\nThe answer is: 5"
    assert hint_text(example, "target") == "2 + 3 = 5\n\\boxed{5}"


# ----------------------------------------------------------------------------------------------------------
# MetaMathQA
# ----------------------------------------------------------------------------------------------------------


def test_answers_of_the_three_response_shapes():
    assert split_trace_answer("She has 3 + 4 = 7.\n#### 7") == ("She has 3 + 4 = 7.", "7")
    assert split_trace_answer("So $x = \\boxed{\\frac{1}{2}}$.") == ("So $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}")
    # MetaMathQA MATH_AnsAug: a boxed answer, then "The answer is:", which wins (IGPO's extract_answer)
    response = "Thus $y = \\boxed{3}$.\nThe answer is: 3"
    assert split_trace_answer(response) == ("Thus $y = \\boxed{3}$.", "3")
    assert split_trace_answer("He pays 2*9=18 dollars.\nThe answer is: 18") == ("He pays 2*9=18 dollars.", "18")


def test_metamath_rows_filtered_by_type_and_deduplicated(tmp_path):
    rows = [{"type": "GSM_AnsAug", "query": "Q1", "response": "1+1=2\nThe answer is: 2"},
            {"type": "GSM_Rephrased", "query": "Q2", "response": "x\nThe answer is: 4"},
            {"type": "MATH_AnsAug", "query": "Q3", "response": "$\\boxed{9}$\nThe answer is: 9"},
            {"type": "GSM_AnsAug", "query": "Q1", "response": "again\nThe answer is: 2"},
            {"type": "MATH_FOBAR", "query": "Q4", "response": "y\nThe answer is: 1"}]
    path = tmp_path / "metamath.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_reasoning(path, question_field="query", answer_field="response",
                              keep_types=["GSM_AnsAug", "MATH_AnsAug"], dedupe_questions=True)
    assert [(e.question, e.answer, e.trace) for e in examples] == [("Q1", "2", "1+1=2"), ("Q3", "9", "$\\boxed{9}$")]
    assert examples[0].solution == rows[0]["response"]


# ----------------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------------


def test_igpo_and_d1_strictness_against_diffrl_default():
    igpo = load_reward("math", kwargs={"math": {"value": 3.0, "style": "boxed_first", "match": "igpo"}})
    lenient = load_reward("math", kwargs={"math": {"value": 3.0, "style": "boxed_first"}})
    texts = ["so \\boxed{18.0}", "so \\boxed{1,000}", "so \\boxed{18}", "so \\boxed{\\dfrac{1}{2}}", "no box 18"]
    answers = ["18", "1000", "18", "\\frac{1}{2}", "18"]
    assert igpo(texts, [""] * 5, answer=answers).scores.tolist() == [0.0, 0.0, 3.0, 3.0, 0.0]
    assert lenient(texts, [""] * 5, answer=answers).scores.tolist() == [3.0, 3.0, 3.0, 3.0, 0.0]
    d1 = load_reward("math", kwargs={"math": {"value": 2.0, "style": "xml_d1", "match": "exact"}})
    d1_texts = ["<answer>\n18\n</answer>", "<answer>18.0</answer>", "18"]
    assert d1(d1_texts, [""] * 3, answer=["18", "18", "18"]).scores.tolist() == [2.0, 0.0, 2.0]
    assert answers_match("18.0", "18") and not answers_match("18.0", "18", "exact")
    assert extract_answer("no tags at all", "xml_d1") == "no tags at all"   # d1's split returns the text


def test_igpo_normalisation_by_hand():
    from rewards.text.math import normalize_igpo

    # the MATH clean-up IGPO compares with: units, spaces, tfrac / dfrac, "x=" prefixes, bare fractions
    assert normalize_igpo("\\frac12") == "\\frac{1}{2}"
    assert normalize_igpo("\\frac1{2}") == "\\frac{1}{2}"
    assert normalize_igpo("\\frac{12}3") == "\\frac{12}3"        # a braced numerator is left as it is
    assert normalize_igpo("\\dfrac{3}{4}") == "\\frac{3}{4}"
    assert normalize_igpo("x = 5") == "5" and normalize_igpo("3/4") == "\\frac{3}{4}"
    assert normalize_igpo("0.5") == "\\frac{1}{2}" and normalize_igpo(".5") == "\\frac{1}{2}"
    assert normalize_igpo("10\\text{ cm}") == "10" and normalize_igpo("50\\%") == "50"
    assert normalize_igpo("18.0") == "18.0" and normalize_igpo("1,000") == "1,000"


def test_d1_format_regexes_have_no_dotall():
    """Without DOTALL '.' stops at newlines: d1's strict pattern spans its own fixed newlines but not a
    reasoning of two lines, and its soft pattern ('<reasoning>.*?</reasoning>') not even the newline after
    <reasoning>: only a completion written on one line scores there."""
    one_line = "<reasoning>\nadd them\n</reasoning>\n<answer>\n5\n</answer>\n"
    two_lines = "<reasoning>\nadd\nthem\n</reasoning>\n<answer>\n5\n</answer>\n"
    flat = "<reasoning>add them</reasoning> <answer>5</answer>"
    styles = ("strict", "strict_d1", "soft", "soft_d1")
    assert [format_score(one_line, s) for s in styles] == [0.5, 0.5, 0.5, 0.0]
    assert [format_score(two_lines, s) for s in styles] == [0.5, 0.0, 0.5, 0.0]
    assert [format_score(flat, s) for s in styles] == [0.0, 0.0, 0.5, 0.5]
    summed = load_reward("format", kwargs={"format": {"style": ["soft_d1", "int"], "answer_style": "xml_d1"}})
    assert summed([flat, one_line], ["", ""]).scores.tolist() == [1.0, 0.5]   # + 0.5 for an integer answer


def test_published_prompt_templates_character_for_character():
    igpo = "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n\x08oxed{<Your answer>}" \
           "\n</answer>\n\n\n{question}"
    d1 = "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n\n\n{question}"
    for name in ("llada_8b_metamath", "llada_8b_gsm8k", "grpo_baseline_llada_8b_metamath"):
        data = yaml.safe_load((REPO_ROOT / f"configs/igpo/{name}.yaml").read_text())
        assert data["data"]["prompt_template"] == igpo
    data = yaml.safe_load((REPO_ROOT / "configs/igpo/diffu_grpo_llada_8b_gsm8k.yaml").read_text())
    assert data["data"]["prompt_template"] == d1


def test_published_igpo_and_d1_settings():
    igpo = load_config(REPO_ROOT / "configs/igpo/llada_8b_metamath.yaml")
    assert (igpo.optim.weight_decay, igpo.optim.betas, igpo.optim.scheduler, igpo.optim.warmup_steps) == \
        (0.1, [0.9, 0.99], "linear", 50)
    assert igpo.lora.dropout == 0.05 and "attn_out" not in igpo.lora.target_modules
    assert (igpo.loss_norm, igpo.train_batch_size, igpo.group_size, igpo.prompt_mask_prob) == ("micro_batch", 8, 8, 0)
    assert igpo.igpo.inpaint_samples is None and igpo.igpo.hint_layout == "spacing_scaled"
    assert igpo.data.keep_types == ["GSM_AnsAug", "MATH_AnsAug"] and igpo.data.dedupe_questions
    baseline = load_config(REPO_ROOT / "configs/igpo/grpo_baseline_llada_8b_metamath.yaml")
    assert not baseline.igpo.enabled and (baseline.ratio_level, baseline.beta, baseline.prompt_mask_prob) == \
        ("sequence", 0.01, 0.0)
    d1 = load_config(REPO_ROOT / "configs/igpo/diffu_grpo_llada_8b_gsm8k.yaml")
    assert (d1.ratio_level, d1.clip_low, d1.clip_high, d1.updates_per_rollout, d1.group_size, d1.optim.lr,
            d1.prompt_mask_prob, d1.beta, d1.loss_mask) == ("token", 0.5, 0.5, 12, 6, 3e-6, 0.15, 0.04, "until_eos")


# ----------------------------------------------------------------------------------------------------------
# Losses and masks
# ----------------------------------------------------------------------------------------------------------


def test_low_var_kl_gradient_is_zero_not_nan_at_log_ratio_100():
    """log r = 100: verl clamps log r to 20 first, so the value is clamp(e^20 - 21, max 10) = 10 and the
    gradient (through two clamps) is exactly 0 instead of 0 * inf = NaN."""
    log_probs = torch.tensor([-100.0], requires_grad=True)
    kl = kl_penalty(log_probs, torch.tensor([0.0]), "low_var_kl")
    kl.sum().backward()
    assert kl.item() == 10.0 and log_probs.grad.item() == 0.0
    small = torch.tensor([-0.5], requires_grad=True)   # inside the clamps: k3 and its gradient 1 - e^{0.5}
    kl_penalty(small, torch.tensor([0.0]), "low_var_kl").sum().backward()
    assert small.grad.item() == pytest.approx(1 - torch.e ** 0.5)


def test_loss_mask_until_first_eos():
    completions = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 2, 2, 2, 2]])
    assert until_first(completions, 2).int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_micro_batch_token_mean(tiny_dir, tmp_path):
    """IGPO: loss of a micro-batch = its masked token sum / its own token count, vs the whole batch's count."""
    from diffrl.trainers.igpo import IGPOTrainer
    from tests.trainers.test_igpo import make_config

    results = {}
    for norm in ("batch", "micro_batch"):
        trainer = IGPOTrainer(make_config(tiny_dir, tmp_path / norm, updates_per_rollout=1, beta=0.0, loss_norm=norm,
                                          train_batch_size=4))
        trainer.setup()
        batch = trainer.rollout()
        trainer.score(batch)
        batch["loss_masks"][0][0, :5] = False      # the micro-batches now hold different token counts
        total = float(batch["loss_masks"][0].sum())
        results[norm] = [(trainer._loss(batch, 0, slice(s, s + 4), total)[0].item(),
                          float(batch["loss_masks"][0][s:s + 4].sum())) for s in (0, 4)]
    for (batch_loss, tokens), (micro_loss, _) in zip(results["batch"], results["micro_batch"]):
        total = sum(t for _, t in results["batch"])
        assert micro_loss * tokens == pytest.approx(batch_loss * total, rel=1e-5, abs=1e-7)


def test_inpainting_draws_group_size_candidates(tiny_dir, tmp_path):
    from diffrl.trainers.igpo import IGPOTrainer
    from tests.trainers.test_igpo import make_config

    trainer = IGPOTrainer(make_config(tiny_dir, tmp_path, igpo__inpaint_samples=None, igpo__max_replacements=1))
    trainer.setup()
    batch = trainer.rollout()
    stats = trainer.score(batch)
    assert stats["inpaint/candidates"] == stats["inpaint/groups"] * 4   # G = 4 candidates per all-wrong group
    assert stats["inpaint/replaced"] <= stats["inpaint/groups"] * 1


# ----------------------------------------------------------------------------------------------------------
# Diffusion-DPO
# ----------------------------------------------------------------------------------------------------------


def test_dpo_flips_winner_and_loser_independently(tmp_path):
    from PIL import Image

    from diffrl.config import PreferenceDataConfig
    from diffrl.data import PreferenceData
    from diffrl.training.preference import load_batch

    image = Image.new("RGB", (8, 8))
    image.putpixel((0, 0), (255, 255, 255))          # a white pixel at the left edge shows a flip
    image.save(tmp_path / "a.png")
    rows = [{"caption": f"c{i}", "winner": "a.png", "loser": "a.png"} for i in range(16)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = PreferenceData.load(tmp_path)
    config = PreferenceDataConfig(path=str(tmp_path), resolution=8, random_flip=True, proportion_empty_prompts=0.2)
    _, _, winners, losers = load_batch(data, list(range(16)), config, generator=torch.Generator().manual_seed(0),
                                       with_loser=True)
    flipped_w = winners[:, 0, 0, -1] > winners[:, 0, 0, 0]
    flipped_l = losers[:, 0, 0, -1] > losers[:, 0, 0, 0]
    generator = torch.Generator().manual_seed(0)   # the draws: winner flips, loser flips, dropped captions
    assert flipped_w.tolist() == (torch.rand(16, generator=generator) < 0.5).tolist()
    assert flipped_l.tolist() == (torch.rand(16, generator=generator) < 0.5).tolist()
    assert (flipped_w != flipped_l).any()
    for name in ("sd15_pickapic", "sdxl_pickapic"):
        cfg = load_config(REPO_ROOT / f"configs/diffusion_dpo/{name}.yaml")
        assert cfg.data.proportion_empty_prompts == 0.2 and cfg.data.random_flip
    assert load_config(REPO_ROOT / "configs/diffusion_dpo/sd15_pickapic.yaml").optim.gradient_accumulation_steps == 128
