"""IGPO and diffu-GRPO on the tiny masked LM and generated arithmetic."""

import json
import math

import pytest
import torch

from diffrl.config import from_dict
from diffrl.data import countdown_tasks, sudoku_tasks
from diffrl.dllm.hints import build_hints
from diffrl.dllm.masked_lm import MaskedDiffusionLM
from diffrl.dllm.masked_sampler import FREE
from diffrl.dllm.reasoning import pass_at_k
from diffrl.errors import ConfigError
from diffrl.losses import hint_entropy_mask, sequence_log_ratio
from diffrl.trainers import load_config
from diffrl.trainers.igpo import IGPOConfig, IGPOTrainer
from rewards import load_reward
from tests.conftest import REPO_ROOT, run_cli, with_overrides


def make_config(tiny_dir, tmp_path, **overrides):
    data = {"trainer": "igpo", "model": {"path": str(tiny_dir("dllm"))}, "output_dir": str(tmp_path / "run"),
            "max_steps": 2, "seed": 0, "lora": {"rank": 4, "alpha": 8}, "optim": {"lr": 1e-2},
            "data": {"path": "generator:arithmetic", "size": 40, "eval_size": 4},
            "generation": {"gen_length": 16, "block_length": 8, "steps": 8, "rollout": {"temperature": 1.0}},
            "reward": {"weights": {"math": 1.0}}, "group_size": 4, "prompts_per_step": 2, "updates_per_rollout": 2,
            "train_batch_size": 4,
            "igpo": {"min_chunk": 2, "max_chunk": 3, "ratio_low": 0.7, "ratio_high": 0.9, "max_replacements": 2,
                     "inpaint_samples": 4, "free_tail": 0, "hint_text": "target"},
            "logging": {"trackers": [], "progress_bar": False}, "checkpoint": {"every": 1}}
    return from_dict(IGPOConfig, with_overrides(data, overrides))


# ----------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------


def test_hints_cover_the_drawn_fraction_at_the_trace_positions():
    trace = list(range(100, 140))                            # 40 tokens
    for seed in range(20):
        pinned = build_hints(trace, 64, ratio=0.5, min_chunk=5, max_chunk=10,
                             generator=torch.Generator().manual_seed(seed))
        hinted = (pinned != FREE).nonzero().flatten()
        assert 20 <= hinted.numel() < 30                     # stops once >= 50% is covered, one chunk past at most
        assert torch.equal(pinned[hinted], torch.tensor(trace)[hinted])     # each hint sits at its own position
        assert (pinned[40:] == FREE).all()
    assert (build_hints(trace, 64, ratio=0.0, min_chunk=5, max_chunk=10,
                        generator=torch.Generator()) == FREE).all()
    assert (build_hints(trace, 16, ratio=1.0, min_chunk=5, max_chunk=10,
                        generator=torch.Generator()) == torch.tensor(trace[:16])).all()


def test_entropy_filter_keeps_generated_tokens_and_the_top_fifth_of_hints():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.2, 0.3, 0.8, 0.7, 0.4, 0.6, 0.05, 1.0, 2.0]])
    hints = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)   # 10 hints, 2 generated
    keep = hint_entropy_mask(entropy, hints, 0.2)
    assert keep.tolist() == [[False, True, False, False, False, True, False, False, False, False, True, True]]
    one = hint_entropy_mask(torch.tensor([[0.3, 0.1, 0.2]]), torch.tensor([[True, True, False]]), 0.2)
    assert one.tolist() == [[True, False, True]]              # floor(2 x 0.2) = 0 -> at least one hint kept
    none = hint_entropy_mask(torch.rand(2, 5), torch.zeros(2, 5, dtype=torch.bool), 0.2)
    assert none.all()


def test_sequence_ratio_is_the_masked_mean_log_ratio():
    lp, old = torch.tensor([[0.0, -1.0, -2.0]]), torch.tensor([[-1.0, -1.0, -1.0]])
    assert sequence_log_ratio(lp, old, torch.ones(1, 3)).tolist() == [0.0]          # (1 + 0 - 1) / 3
    assert sequence_log_ratio(lp, old, torch.tensor([[1.0, 1.0, 0.0]])).tolist() == [0.5]


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)   # 1 - C(3, 2) / C(4, 2)


def test_log_prob_estimator_equals_a_plain_recomputation(tiny_dir):
    model = MaskedDiffusionLM.from_pretrained(tiny_dir("dllm"))
    prompt_ids, prompt_mask = model.left_pad(model.chat_prompt_ids(["1+2", "3*4-5"]))
    completion = torch.randint(10, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    log_probs, entropy = model.completion_log_probs(prompt_ids, prompt_mask, completion, mask_seed=7,
                                                    prompt_mask_prob=0.3)
    drop = torch.rand(prompt_ids.shape, generator=torch.Generator().manual_seed(7)) < 0.3
    assert drop.any()
    for b in range(2):
        ids = prompt_ids[b].clone()
        for i in range(ids.shape[0]):
            if drop[b, i] and prompt_mask[b, i]:
                ids[i] = model.mask_id
        ids = torch.cat([ids, torch.full((8,), model.mask_id)])
        attention = torch.cat([prompt_mask[b], torch.ones(8, dtype=torch.long)])
        with torch.no_grad():
            logits = model.module(input_ids=ids[None], attention_mask=attention[None]).logits[0, -8:].double()
        for t in range(8):
            probs = torch.softmax(logits[t], -1)
            assert log_probs[b, t].item() == pytest.approx(math.log(probs[completion[b, t]].item()), abs=1e-4)
            assert entropy[b, t].item() == pytest.approx(-(probs * probs.log()).sum().item(), abs=1e-4)
    again, _ = model.completion_log_probs(prompt_ids, prompt_mask, completion, mask_seed=7, prompt_mask_prob=0.3)
    assert torch.equal(again, log_probs)                      # the same seed, the same masking


def test_countdown_and_sudoku_generators_satisfy_their_rewards():
    tasks = countdown_tasks(20, seed=3)
    reward = load_reward("countdown")
    out = reward([t.target for t in tasks], [t.question for t in tasks],
                 numbers=[t.metadata["numbers"] for t in tasks], target=[t.metadata["target"] for t in tasks])
    assert out.scores.tolist() == [1.0] * 20 and out.extras["countdown/correct"].all()
    tasks = sudoku_tasks(20, seed=3)
    for task in tasks:
        grid = [task.answer[r * 4:(r + 1) * 4] for r in range(4)]
        assert all(sorted(row) == list("1234") for row in grid)
        assert all(sorted(col) == list("1234") for col in zip(*grid))
        assert all(sorted(grid[r][c] for r in (br, br + 1) for c in (bc, bc + 1)) == list("1234")
                   for br in (0, 2) for bc in (0, 2))
        assert task.metadata["puzzle"].count("0") == 6
    reward = load_reward("sudoku")
    out = reward([t.target for t in tasks], [t.question for t in tasks],
                 puzzle=[t.metadata["puzzle"] for t in tasks], solution=[t.metadata["solution"] for t in tasks])
    assert out.scores.tolist() == [1.0] * 20


# ----------------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------------


def test_inpainting_fires_only_for_all_wrong_groups_and_replaces_the_configured_count(tiny_dir, tmp_path):
    trainer = IGPOTrainer(make_config(tiny_dir, tmp_path))
    trainer.setup()
    batch = trainer.rollout()
    tok = trainer.model.tokenizer
    # Group 0: one completion is the reference answer (correct); group 1: all wrong.
    right = tok(batch["tasks"][0].target, add_special_tokens=False).input_ids[:16]
    batch["completions"][0] = tok.eos_token_id
    batch["completions"][0, :len(right)] = torch.tensor(right)
    stats = trainer.score(batch)
    assert stats["inpaint/groups"] == 1 and stats["all_wrong_ratio"] == 0.5
    # ratio 0.7-0.9 of a short trace pins the boxed answer often: some inpainted completions are right
    assert stats["inpaint/rescued"] == 1 and stats["inpaint/replaced"] == 2
    hints = batch["hint_mask"]
    assert not hints[:4].any() and hints[4:6].any(dim=1).all() and not hints[6:].any()
    assert (batch["advantages"].view(2, 4).sum(1).abs() < 1e-5).all()       # dr_grpo: r - group mean
    assert batch["advantages"][4:6].gt(0).all() and batch["advantages"][6:].lt(0).all()


@pytest.mark.parametrize("rollout_threshold, eval_threshold, rollout_calls, eval_calls", [
    (None, None, 8, 8),        # exact: 8 steps for each of the rollout's and the evaluation's batches
    (0.001, None, 2, 8),       # every token beats 0.001 (a random model's confidence is ~1/80): 1 call a block
    (None, 0.001, 8, 2),
])
def test_parallel_decoding_is_switched_separately_for_rollouts_and_evaluation(tiny_dir, tmp_path, rollout_threshold,
                                                                            eval_threshold, rollout_calls, eval_calls):
    # greedy rollouts: a sampled token can be the mask token itself, which leaves its position masked
    trainer = IGPOTrainer(make_config(tiny_dir, tmp_path, generation__rollout__parallel_threshold=rollout_threshold,
                                      generation__eval__parallel_threshold=eval_threshold,
                                      generation__rollout__temperature=0.0))
    trainer.setup()
    calls, original = [], trainer.model.logits

    def counted(x, attention_mask=None):
        calls.append(x.shape[0])
        return original(x, attention_mask)

    trainer.model.logits = counted
    trainer.rollout()                                  # 2 prompts x 4 samples: one generation batch
    assert len(calls) == rollout_calls
    calls.clear()
    trainer.evaluate()                                 # 4 held-out questions, greedy: one batch
    assert len(calls) == eval_calls


@pytest.mark.parametrize("rollout_cache, eval_cache", [("dual", None), (None, "prefix")])
def test_the_kv_cache_is_switched_separately_for_rollouts_and_evaluation(tiny_dir, tmp_path, rollout_cache,
                                                                         eval_cache):
    """Cached steps run only part of the sequence: the model's input lengths show which phase used a cache."""
    trainer = IGPOTrainer(make_config(tiny_dir, tmp_path, generation__rollout__kv_cache=rollout_cache,
                                      generation__eval__kv_cache=eval_cache))
    trainer.setup()
    lengths, original = [], trainer.model.logits

    def counted(x, attention_mask=None, **kwargs):
        lengths.append(x.shape[1])
        return original(x, attention_mask, **kwargs)

    trainer.model.logits = counted
    trainer.rollout()
    rollout_lengths = set(lengths)
    lengths.clear()
    trainer.evaluate()
    assert (len(rollout_lengths) > 1) == (rollout_cache is not None)      # full passes and shorter cached ones
    assert (len(set(lengths)) > 1) == (eval_cache is not None)


def test_loss_mask_and_gradients_reach_generated_tokens_and_only_top_entropy_hints(tiny_dir, tmp_path):
    trainer = IGPOTrainer(make_config(tiny_dir, tmp_path, updates_per_rollout=1, beta=0.0))
    trainer.setup()
    batch = trainer.rollout()
    stats = trainer.score(batch)
    assert stats["inpaint/replaced"] > 0
    mask, hints = batch["loss_masks"][0], batch["hint_mask"]
    assert mask[~hints].all()                                               # every self-generated token
    for row in hints.any(1).nonzero().flatten().tolist():
        count = int(hints[row].sum())
        assert int((mask[row] & hints[row]).sum()) == max(1, int(count * 0.2))
    # Gradients: the trainer's loss reaches a completion position's logits exactly where the mask keeps it
    # (for samples with a non-zero advantage; token-level ratios, so each token's loss is its own).
    trainer.config.ratio_level = "token"
    captured = []

    def keep_logits(module, args, out):
        out.logits.retain_grad()
        captured.append(out.logits)

    hook = trainer.model.module.register_forward_hook(keep_logits)
    trainer.model.denoiser.train()
    loss, _ = trainer._loss(batch, 0, slice(None), float(mask.sum()))
    hook.remove()
    loss.backward()
    grads = captured[-1].grad[:, -mask.shape[1]:].abs().sum(-1)
    expected = mask & (batch["advantages"] != 0)[:, None]
    assert expected.any() and torch.equal(grads > 0, expected)


def test_two_steps_change_every_lora_parameter(tiny_dir, tmp_path):
    trainer = IGPOTrainer(make_config(tiny_dir, tmp_path))
    trainer.setup()
    params = {n: p for n, p in trainer.model.module.named_parameters() if p.requires_grad}
    assert params and all("lora" in n for n in params)
    before = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(2):
        batch = trainer.rollout()
        trainer.score(batch)
        out = trainer.update(batch)
        trainer.step += 1
        assert math.isfinite(out["loss"]) and out["skipped"] == 0
    assert [n for n, p in params.items() if torch.equal(p, before[n])] == []


@pytest.mark.parametrize("enabled", [True, False])
def test_end_to_end_logs_inpainting_and_resumes_exactly(tiny_dir, tmp_path, enabled):
    IGPOTrainer(make_config(tiny_dir, tmp_path / "a", max_steps=3, igpo__enabled=enabled)).train()
    IGPOTrainer(make_config(tiny_dir, tmp_path / "b", max_steps=1, igpo__enabled=enabled)).train()
    IGPOTrainer(make_config(tiny_dir, tmp_path / "b", max_steps=3, igpo__enabled=enabled,
                            checkpoint__resume="latest")).train()

    def rows(run):
        lines = (tmp_path / run / "run" / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if "loss" in r]

    a, b = rows("a"), rows("b")
    assert [(r["step"], r["loss"], r["reward"]) for r in a] == [(r["step"], r["loss"], r["reward"]) for r in b]
    if enabled:
        assert all(r["inpaint/groups"] > 0 for r in a) and sum(r["inpaint/rescued"] for r in a) > 0
    else:
        assert all("inpaint/groups" not in r for r in a)
    final = [json.loads(line) for line in (tmp_path / "a/run/metrics.jsonl").read_text().splitlines()][-1]
    assert "eval/accuracy" in final


@pytest.mark.parametrize("overrides, message", [
    ({"ratio_level": "group"}, "ratio_level must be 'sequence' or 'token'"),
    ({"lora__enabled": False}, "beta > 0 needs the LoRA-free model"),
    ({"igpo__max_chunk": 1, "igpo__min_chunk": 3}, "igpo.max_chunk"),
    ({"igpo__max_replacements": 9}, "cannot exceed group_size"),
])
def test_bad_igpo_configs(tiny_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(tiny_dir, tmp_path, **overrides)


def test_unknown_correctness_reward_fails_at_setup(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="correctness: 'countdown' is not one of the rewards"):
        IGPOTrainer(make_config(tiny_dir, tmp_path, correctness="countdown")).setup()


# ----------------------------------------------------------------------------------------------------------
# Shipped configs and the CLI
# ----------------------------------------------------------------------------------------------------------

PUBLISHED = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "configs" / "igpo").glob("*.yaml")
                   if not p.name.startswith("tiny"))


@pytest.mark.parametrize("path", PUBLISHED)
def test_published_config_starts_on_the_tiny_model(tiny_dir, tmp_path, path):
    """The algorithm settings are the shipped ones; model, data, sizes and batch counts are overridden."""
    gemma = "diffusiongemma" in path  # the tiny model of its kind, whose canvas is 16 tokens
    config = load_config(REPO_ROOT / path, [
        f"model.path={tiny_dir('diffusion_gemma' if gemma else 'dllm')}", "model.dtype=float32",
        "model.trust_remote_code=false", "model.gradient_checkpointing=false", "mixed_precision=no",
        f"output_dir={tmp_path / 'run'}", "max_steps=1", "data.path=generator:arithmetic", "data.size=20",
        "data.eval_size=2", "data.prompt_template='{question}'", "data.generator_options={}",
        "generation.gen_length=16", f"generation.block_length={16 if gemma else 8}", "generation.steps=4",
        "prompts_per_step=1", "group_size=4", "generation_batch_size=16", "train_batch_size=4", "updates_per_rollout=1",
        "lora.rank=4", "lora.alpha=8", "lora.target_modules=null", "reward.weights={math: 1.0}", "reward.kwargs={}",
        "eval_k=1", "logging.trackers=[]", "logging.progress_bar=false", "checkpoint.every=1",
        "igpo.max_replacements=2", "igpo.min_chunk=2", "igpo.max_chunk=3"])
    result = IGPOTrainer(config).train()
    assert math.isfinite(result["loss"]) and "eval/accuracy" in result


def test_tiny_config_trains_and_evaluates_from_the_cli(tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "configs/igpo/tiny_arithmetic.yaml", f"model.path={tiny_dir('dllm')}",
                     f"output_dir={out}", "max_steps=2", "logging.progress_bar=false")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["inpaint/groups"] > 0
    result = run_cli("eval", "configs/igpo/tiny_arithmetic.yaml", f"model.path={tiny_dir('dllm')}",
                     "--checkpoint", str(out / "checkpoints" / "step-000002"), "--k", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["tasks"] == 16 and 0 <= metrics["eval/accuracy"] <= metrics["eval/pass@2"] <= 1
    # without --checkpoint the numbers are the base model's: said so; another model's checkpoint: one line
    base = run_cli("eval", str(out), "--k", "1")
    assert base.returncode == 0 and "note: no --checkpoint: this evaluates the base model" in base.stderr
    foreign = run_cli("eval", str(out), "lora.rank=4", "--checkpoint", str(out / "checkpoints" / "step-000002"))
    assert foreign.returncode == 1 and "Traceback" not in foreign.stderr, foreign.stderr[-1500:]
    last = foreign.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "does not fit this model" in last and "give a checkpoint of this run" in last


def test_coupled_log_prob_estimator_by_hand(tiny_dir):
    """DiffuCoder's coupled estimate: t ~ U(0.2, 0.8), mask M at rate t and its complement; per token
    (log p_full + [M] log p_M / t + [not M] log p_notM / (1 - t)) / 2, each pass computed on its own here."""
    model = MaskedDiffusionLM.from_pretrained(tiny_dir("dllm"))
    prompt_ids, prompt_mask = model.left_pad(model.chat_prompt_ids(["1+2", "3*4-5"]))
    completion = torch.randint(10, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    log_probs, entropy = model.completion_log_probs(prompt_ids, prompt_mask, completion, mask_seed=3,
                                                    prompt_mask_prob=0.0, estimator="coupled")
    draws = torch.Generator().manual_seed(3)
    torch.rand(prompt_ids.shape, generator=draws)             # the prompt draw comes first (rate 0 here)
    t = 0.2 + 0.6 * float(torch.rand((), generator=draws))
    hidden = torch.rand(completion.shape, generator=draws) < t
    assert 0.2 <= t <= 0.8 and hidden.any() and (~hidden).any()

    def log_p(shown: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([prompt_ids, torch.where(shown, completion, model.mask_id)], 1)
        attention = torch.cat([prompt_mask, torch.ones_like(completion)], 1)
        with torch.no_grad():
            logits = model.module(input_ids=ids, attention_mask=attention).logits[:, -8:].double()
        return torch.log_softmax(logits, -1).gather(-1, completion[..., None])[..., 0]

    full, masked_part, complement = log_p(torch.zeros_like(hidden)), log_p(~hidden), log_p(hidden)
    for b in range(2):
        for i in range(8):
            part = masked_part[b, i] / t if hidden[b, i] else complement[b, i] / (1 - t)
            assert log_probs[b, i].item() == pytest.approx(((full[b, i] + part) / 2).item(), abs=1e-4)
    d1, d1_entropy = model.completion_log_probs(prompt_ids, prompt_mask, completion, mask_seed=3,
                                                prompt_mask_prob=0.0)
    assert torch.allclose(d1, full.float(), atol=1e-4) and torch.allclose(entropy, d1_entropy, atol=1e-5)
    again, _ = model.completion_log_probs(prompt_ids, prompt_mask, completion, mask_seed=3, prompt_mask_prob=0.0,
                                          estimator="coupled")
    assert torch.equal(again, log_probs)                      # old and new policy see the same masks


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_old_log_probs_are_computed_as_the_policy_s_so_the_first_ratio_is_one_without_dropout(tiny_dir, tmp_path,
                                                                                             dropout):
    """d1 computes the old log-probs in training mode without gradient (TRL's training_step calls model.train()
    first), so does diffrl. Without dropout the first inner step's ratio is then exactly 1 (old = policy, same
    mask seed); with LoRA dropout the old log-probs saw dropout, as d1's do (they differ from an eval-mode pass)."""
    from diffrl.dllm.reasoning import chunked_log_probs

    trainer = IGPOTrainer(make_config(tiny_dir, tmp_path, lora__dropout=dropout, igpo__enabled=False))
    trainer.setup()
    with torch.no_grad():   # a trained adapter (B starts at 0, which would hide its dropout)
        for name, p in trainer.model.module.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(0))
    batch = trainer.rollout()
    trainer.score(batch)
    cfg, seed = trainer.config, batch["mask_seeds"][0]
    trainer.model.denoiser.train()   # as update() runs the policy
    torch.manual_seed(1)
    args = (trainer.model, batch["prompt_ids"], batch["prompt_mask"], batch["completions"])
    options = dict(chunk=cfg.train_batch_size, mask_seed=seed, prompt_mask_prob=cfg.prompt_mask_prob,
                   estimator=cfg.log_prob_estimator)
    policy, _ = chunked_log_probs(*args, **options)
    old = batch["old_log_probs"][0]
    if dropout == 0.0:
        assert torch.equal(old, policy)          # ratio exp(policy - old) == 1 exactly at the first inner step
    else:
        trainer.model.module.eval()
        without_dropout, _ = chunked_log_probs(*args, **options)
        assert not torch.equal(old, without_dropout) and not torch.equal(old, policy)
