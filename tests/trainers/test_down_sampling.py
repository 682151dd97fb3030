"""``down_sampling`` (D^3S, our reconstruction): the kept samples and tokens by hand, the annealed shares, and
IGPO / diffu-GRPO training on exactly those, resuming exactly."""

import itertools

import pytest
import torch

from diffrl.dllm.reasoning import until_first
from diffrl.errors import ConfigError
from diffrl.losses import hint_entropy_mask
from diffrl.trainers.igpo import IGPOTrainer
from diffrl.training.down_sampling import DownSamplingConfig, kept_samples, kept_size, kept_tokens
from tests.trainers.steps import step_rows
from tests.trainers.test_igpo import make_config


def _best_subset_by_brute_force(rewards: list[float], size: int) -> set[int]:
    def variance(idx):
        values = [rewards[i] for i in idx]
        mean = sum(values) / len(values)
        return sum((v - mean) ** 2 for v in values) / len(values)
    return set(max(itertools.combinations(range(len(rewards)), size), key=variance))


def test_each_group_keeps_its_highest_variance_subset():
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.4, 0.0, 1.0, 1.0, 0.95, 0.3, 0.2, 0.25, 0.7], dtype=torch.float64)
    groups = torch.tensor([7] * 6 + [3] * 6)
    keep = kept_samples(rewards, groups, 0.5)          # 3 of each 6
    assert set(keep[:6].nonzero().flatten().tolist()) == _best_subset_by_brute_force(rewards[:6].tolist(), 3)
    second = _best_subset_by_brute_force(rewards[6:].tolist(), 3)
    assert set(keep[6:].nonzero().flatten().tolist()) == second and keep.sum() == 6
    # a NaN is never kept; two at least; share 1 keeps everything
    with_nan = torch.tensor([0.0, float("nan"), 1.0, 0.5])
    assert kept_samples(with_nan, torch.zeros(4), 0.25).tolist() == [True, False, True, False]
    assert kept_size(8, 0.1) == 2 and kept_size(8, 0.5) == 4 and kept_size(6, 0.34) == 3
    assert kept_samples(rewards, groups, 1.0).all()


def test_tokens_are_kept_by_abs_advantage_times_entropy_over_the_whole_batch():
    advantages = torch.tensor([2.0, -0.5])
    entropy = torch.tensor([[0.1, 0.3, 0.2, 0.9], [1.0, 0.8, 0.1, 0.4]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    # scores: row 0: 0.2 0.6 0.4 (0.9 masked); row 1: 0.5 0.4 0.05 0.2 -> 7 valid, keep ceil(0.5 * 7) = 4
    kept = kept_tokens(advantages, entropy, mask, 0.5)
    assert kept.tolist() == [[False, True, True, False], [True, True, False, False]]


def test_shares_rise_linearly_to_one():
    config = DownSamplingConfig(sample_keep=0.5, token_keep=0.25, anneal_steps=4)
    assert [config.shares(s, 100) for s in (0, 2, 4, 9)] == [(0.5, 0.25), (0.75, 0.625), (1.0, 1.0), (1.0, 1.0)]
    assert DownSamplingConfig(sample_keep=0.5).shares(5, 10) == (0.75, 1.0)    # anneal over max_steps


def _config(tiny_dir, tmp_path, **overrides):
    # diffu-GRPO, 2 prompts of 8 completions, keeping 4 of each group and half the tokens at step 0
    return make_config(tiny_dir, tmp_path, **{"igpo__enabled": False, "group_size": 8, "train_batch_size": 8,
                                              "down_sampling": {"sample_keep": 0.5, "token_keep": 0.5,
                                                                "anneal_steps": 4}, **overrides})


def test_igpo_trains_on_the_kept_completions_and_tokens(tiny_dir, tmp_path):
    trainer = IGPOTrainer(_config(tiny_dir, tmp_path))
    trainer.setup()
    batch = trainer.rollout()
    completions = batch["completions"].clone()
    stats = trainer.score(batch)
    assert batch["completions"].shape[0] == 8 and batch["group_ids"].tolist() == [0] * 4 + [1] * 4
    assert stats["down_sampling/kept_per_group"] == 4 and stats["down_sampling/sample_share"] == 0.5
    # the kept rows are the rollout's, the max-variance 4 of each group of 8
    rewards = batch["rewards"].tolist()
    for g in range(2):
        kept_rows = [next(i for i in range(8 * g, 8 * g + 8) if torch.equal(completions[i], row))
                     for row in batch["completions"][4 * g:4 * g + 4]]
        assert len(set(kept_rows)) == 4
    # advantages are the subset's own (dr_grpo: r - group mean)
    for g in range(2):
        r = torch.tensor(rewards[4 * g:4 * g + 4])
        assert torch.allclose(batch["advantages"][4 * g:4 * g + 4].float(), (r - r.mean()).float(), atol=1e-6)
    # each iteration's loss mask keeps half the tokens it would have had (by |A| x entropy)
    for mask, seed in zip(batch["loss_masks"], batch["mask_seeds"]):
        _, entropy = trainer._log_probs(batch, seed)
        before = hint_entropy_mask(entropy, batch["hint_mask"], trainer.config.igpo.entropy_keep_ratio)
        if trainer.config.loss_mask == "until_eos":
            before = before & until_first(batch["completions"], trainer.model.tokenizer.eos_token_id)
        assert torch.equal(mask, kept_tokens(batch["advantages"], entropy, before, 0.5))
        assert mask.sum() == -(-int(before.sum()) // 2)
    assert stats["down_sampling/token_share"] == 0.5


def test_down_sampling_resumes_exactly(tiny_dir, tmp_path):
    IGPOTrainer(_config(tiny_dir, tmp_path / "a", max_steps=3)).train()
    IGPOTrainer(_config(tiny_dir, tmp_path / "b", max_steps=1)).train()
    IGPOTrainer(_config(tiny_dir, tmp_path / "b", max_steps=3, checkpoint__resume="latest")).train()

    def rows(run):
        return step_rows(tmp_path / run / "run", "step", "loss", "down_sampling/sample_share",
                         "down_sampling/tokens_kept")

    assert rows("a") == rows("b") and [r[2] for r in rows("a")] == [0.5, 0.625, 0.75]


def test_down_sampling_settings_are_checked(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="sample_keep"):
        _config(tiny_dir, tmp_path, down_sampling={"sample_keep": 1.5})
    with pytest.raises(ConfigError, match="token_keep"):
        _config(tiny_dir, tmp_path, down_sampling={"token_keep": 0})


def _flow_case(name, tiny_dir, tmp_path):
    from diffrl.trainers.awm import AWMTrainer
    from diffrl.trainers.flow_grpo import FlowGRPOTrainer
    from diffrl.trainers.nft import NFTTrainer
    from tests.trainers.test_awm import make_config as awm_config
    from tests.trainers.test_flow_grpo import make_config as grpo_config
    from tests.trainers.test_nft import make_config as nft_config

    cls, make = {"awm": (AWMTrainer, awm_config), "flow_grpo": (FlowGRPOTrainer, grpo_config),
                 "nft": (NFTTrainer, nft_config)}[name]
    # 2 prompts of 6 samples; half of each group (3) kept at step 0
    return cls(make(tiny_dir, tmp_path, group_size=6, prompts_per_step=2, sample_batch_size=6,
                    down_sampling={"sample_keep": 0.5, "anneal_steps": 10}))


@pytest.mark.parametrize("name", ["awm", "flow_grpo", "nft"])
def test_flow_trainers_train_on_each_groups_max_variance_samples(name, tiny_dir, tmp_path):
    from diffrl.advantages import get_estimator

    trainer = _flow_case(name, tiny_dir, tmp_path)
    trainer.setup()
    batch = trainer.rollout()
    rewards, _ = batch["scorer"].result()          # the reward is deterministic: what score() will read
    before = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor) and v.shape[0] == 12}
    prompts = list(batch["prompts"])
    stats = trainer.score(batch)
    keep = kept_samples(rewards, before["group_ids"], 0.5)
    assert keep.sum() == 6 and stats["down_sampling/kept"] == 0.5
    for key, value in before.items():          # every per-sample entry cut to the kept samples, in order
        assert torch.equal(batch[key], value[keep]), key
    assert batch["prompts"] == [p for p, k in zip(prompts, keep.tolist()) if k]
    cfg = trainer.config
    expected = get_estimator(cfg.estimator, **cfg.estimator_kwargs)(rewards.masked_fill(~keep, float("nan")),
                                                                     before["group_ids"])[keep]
    if name == "nft":
        from diffrl.trainers.nft import optimality
        assert torch.allclose(batch["r"], optimality(expected, cfg.adv_clip_max))
    else:
        from diffrl.advantages import clip_advantages
        scale = {"scale": cfg.advantage_max / cfg.adv_clip_max} if name == "awm" else {}
        assert torch.allclose(batch["advantages"], clip_advantages(expected, max_abs=cfg.adv_clip_max, **scale))
    lora = {n: p.detach().clone() for n, p in trainer.model.transformer.named_parameters() if p.requires_grad}
    trainer.update(batch)
    changed = [n for n, p in trainer.model.transformer.named_parameters() if p.requires_grad
               and not torch.equal(p.detach(), lora[n])]
    assert changed and all("lora" in n for n in changed)


def test_a_process_with_no_sample_still_meets_the_gradient_sync():
    from accelerate import Accelerator

    from diffrl.training.step_guard import accumulate

    module = torch.nn.Linear(3, 2)
    totals = accumulate(Accelerator(cpu=True), module, 0, lambda i: (_ for _ in ()).throw(AssertionError("called")))
    assert totals == {"loss": 0.0}
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in module.parameters())


def test_flow_trainers_refuse_the_token_level(tiny_dir, tmp_path):
    from tests.trainers.test_awm import make_config as awm_config

    with pytest.raises(ConfigError, match="down_sampling.token_keep is D\\^3S's token level, for diffusion LMs"):
        awm_config(tiny_dir, tmp_path, down_sampling={"token_keep": 0.5})
