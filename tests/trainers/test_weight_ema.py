"""The weight EMA rule of flow_grpo's and AWM's ema.py, and the calls each trainer makes, by hand."""

import pytest
import torch

from diffrl.training.weight_ema import WeightEMA


def test_awm_rule_every_step():
    p = torch.nn.Parameter(torch.zeros(2))
    ema = WeightEMA([p], decay=0.99)
    with torch.no_grad():
        p.fill_(1.0)
    ema.step(1)  # AWM calls it after global_step += 1: d = min(0.99, 2 / 11), shadow = (1 - 2/11) * 1
    assert ema.shadow[0][0].item() == pytest.approx(9 / 11)
    with ema.applied():
        assert p[0].item() == pytest.approx(9 / 11)
    assert p[0].item() == 1.0


def test_flow_grpo_rule_every_eight():
    """decay 0.9, every 8: only n with (n + 1) % 8 == 0 update, and repeated calls with that n each update."""
    p = torch.nn.Parameter(torch.ones(1))
    ema = WeightEMA([p], decay=0.9, every=8)
    with torch.no_grad():
        p.fill_(2.0)
    for n in range(7):
        ema.step(n)
    assert ema.shadow[0].item() == 1.0  # n = 0..6: nothing
    ema.step(7)  # d = min(0.9, 8 / 17) = 8/17: shadow = 8/17 * 1 + 9/17 * 2
    first = 8 / 17 + 9 / 17 * 2
    assert ema.shadow[0].item() == pytest.approx(first)
    ema.step(7)  # flow_grpo calls it once per micro-batch: the same n updates again
    assert ema.shadow[0].item() == pytest.approx(8 / 17 * first + 9 / 17 * 2)
    ema.step(15)  # d = min(0.9, 16 / 25) = 0.64
    assert ema.shadow[0].item() == pytest.approx(0.64 * (8 / 17 * first + 9 / 17 * 2) + 0.36 * 2)
