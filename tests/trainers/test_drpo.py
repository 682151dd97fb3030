"""``loss: drpo`` in IGPO / diffu-GRPO: the loss of a micro-batch equals DRPO's public form derived by hand from
the policy's log-probs, it trains, and the settings that make no sense are one line."""

import math

import pytest
import torch

from diffrl.dllm.reasoning import until_first
from diffrl.errors import ConfigError
from diffrl.trainers.igpo import IGPOTrainer
from tests.trainers.test_igpo import make_config

CORRECT = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]     # group 0 usable, group 1 all right (dropped, still counted)


def _config(tiny_dir, tmp_path, **overrides):
    return make_config(tiny_dir, tmp_path, **{"igpo__enabled": False, "loss": "drpo", "beta": 0.0,
                                              "train_batch_size": 8, "updates_per_rollout": 2,
                                              "drpo": {"lam": 0.5, "tau": 2.0, "beta": 50.0, "delta": 1e-4},
                                              **overrides})


def test_drpo_micro_batch_loss_is_the_public_form_by_hand(tiny_dir, tmp_path):
    trainer = IGPOTrainer(_config(tiny_dir, tmp_path))
    trainer.setup()
    with torch.no_grad():   # a policy away from the rollout's, so that the KL constraint is on
        for name, p in trainer.model.module.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(0))
    batch = trainer.rollout()
    trainer.score(batch)
    batch["correct"] = torch.tensor(CORRECT) > 0.5
    with torch.no_grad():
        for name, p in trainer.model.module.named_parameters():
            if "lora_B" in name:
                p.mul_(-1.0)
    trainer.model.denoiser.eval()                       # no dropout: the same log-probs twice
    cfg, seed = trainer.config, batch["mask_seeds"][1]
    with torch.no_grad():
        loss, parts = trainer._loss(batch, 1, slice(0, 8), 1.0)
        new, _ = trainer.model.completion_log_probs(batch["prompt_ids"], batch["prompt_mask"], batch["completions"],
                                                    mask_seed=seed, prompt_mask_prob=cfg.prompt_mask_prob,
                                                    estimator=cfg.log_prob_estimator)
    old = batch["old_log_probs"][1]
    response = until_first(batch["completions"], trainer.model.tokenizer.eos_token_id) & batch["loss_masks"][1]
    # the public form, written out: per-question lists, scores the response-mask mean, the negatives'
    # tau * log-sum-exp (its code's sum / sum.detach() has this gradient), Q counting every question
    lam, tau, beta, delta = 0.5, 2.0, 50.0, 1e-4
    scores = [float((new[i] * response[i]).sum() / max(1, int(response[i].sum()))) for i in range(8)]
    ratios = [int(response[i].sum()) / cfg.generation.gen_length for i in range(8)]
    total = 0.0
    for group in (range(0, 4), range(4, 8)):
        pos = [i for i in group if CORRECT[i] == 1.0]
        neg = [i for i in group if CORRECT[i] == 0.0]
        if not pos or not neg:
            continue
        lse = tau * math.log(sum(math.exp(scores[j] / tau) for j in neg))
        weights = [math.exp((1 - ratios[i]) / lam) for i in pos]
        total += sum(w * (scores[i] - lse) for w, i in zip(weights, pos)) / sum(weights)
    kl = float(((old - new) * response).sum() / response.sum())
    expected = -total / 2 + max(beta * (kl - delta), 0.0) * kl
    assert kl > delta and parts["kl_to_rollout"] == pytest.approx(kl, rel=1e-5)
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert parts["drpo/usable_groups"] == 1.0 and parts["drpo/groups"] == 2.0


def test_drpo_trains(tiny_dir, tmp_path):
    trainer = IGPOTrainer(_config(tiny_dir, tmp_path, updates_per_rollout=1))
    trainer.setup()
    batch = trainer.rollout()
    trainer.score(batch)
    batch["correct"] = torch.tensor(CORRECT) > 0.5
    before = {n: p.detach().clone() for n, p in trainer.model.module.named_parameters() if p.requires_grad}
    metrics = trainer.update(batch)
    moved = [n for n, p in trainer.model.module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and metrics["drpo/usable_groups"] == 1.0 and math.isfinite(metrics["loss"])


def test_drpo_settings_that_make_no_sense_are_one_line(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"make train_batch_size \(6\) a multiple of group_size \(4\)"):
        _config(tiny_dir, tmp_path, train_batch_size=6)
    with pytest.raises(ConfigError, match="loss: drpo uses no advantages"):
        _config(tiny_dir, tmp_path, down_sampling={"sample_keep": 0.5})
    with pytest.raises(ConfigError, match="loss"):
        _config(tiny_dir, tmp_path, loss="disco")
