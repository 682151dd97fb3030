import math

import pytest
import torch

from diffrl.errors import RewardError
from rewards import RewardOutput, load_reward, register_reward


@register_reward("test_brightness", modality="image")
class Brightness:
    """Mean pixel value (test reward)."""

    def __init__(self, device="cpu", offset=0.0):
        self.offset = offset

    def __call__(self, samples, prompts, **metadata):
        return RewardOutput(samples.mean(dim=(1, 2, 3)) + self.offset, {"n": len(prompts)})


@register_reward("test_only_cats", modality="image")
class OnlyCats:
    """1 for prompts about cats, NaN (not applicable) otherwise."""

    def __init__(self, device="cpu"):
        pass

    def __call__(self, samples, prompts, **metadata):
        return RewardOutput(torch.tensor([1.0 if "cat" in p else math.nan for p in prompts]))


@register_reward("test_wrong_shape", modality="image")
def wrong_shape(device="cpu"):
    return lambda samples, prompts, **m: RewardOutput(torch.zeros(len(prompts) + 1))


def test_weighted_sum_with_nan_components_renormalized():
    images = torch.stack([torch.full((3, 2, 2), 0.5), torch.full((3, 2, 2), 0.25)])
    reward = load_reward({"test_brightness": 1.0, "test_only_cats": 3.0})
    out = reward(images, ["a cat", "a dog"])
    # cat: 1*0.5 + 3*1 = 3.5 (weights sum 4 of 4); dog: only brightness applies: 0.25 * 4/1 = 1.0
    torch.testing.assert_close(out.scores, torch.tensor([3.5, 1.0]))
    torch.testing.assert_close(out.extras["test_brightness"], torch.tensor([0.5, 0.25]))
    assert out.extras["test_brightness/n"] == 2 and math.isnan(out.extras["test_only_cats"][1])


def test_list_spec_with_kwargs_and_all_nan_sample():
    reward = load_reward([{"name": "test_only_cats"}, {"name": "test_brightness", "weight": 0.0, "kwargs": {}}])
    out = reward(torch.zeros(1, 3, 2, 2), ["a dog"])
    assert math.isnan(out.scores[0])


@pytest.mark.parametrize("spec, message", [
    ("test_brightnes", "unknown reward 'test_brightnes'; did you mean 'test_brightness'?"),
    ({}, "the reward spec is empty"),
    ([{"weight": 1}], "need a 'name'"),
    ("nosuchmodule:Thing", "cannot be imported"),
    ({"test_brightness": 1.0}, None),
])
def test_bad_specs(spec, message):
    if message is None:
        assert load_reward(spec).names == ["test_brightness"]
        return
    with pytest.raises(RewardError, match=message):
        load_reward(spec)


def test_bad_kwargs_and_shapes():
    with pytest.raises(RewardError, match="does not accept these arguments"):
        load_reward("test_brightness", kwargs={"test_brightness": {"nope": 1}})
    with pytest.raises(RewardError, match=r"returned scores of shape \(3,\), expected \(2,\)"):
        load_reward("test_wrong_shape")(torch.zeros(2, 3, 2, 2), ["a", "b"])


def test_every_builtin_reward_module_is_discovered():
    """A reward module that registers a reward but is missing from the built-in list is never imported by
    ``load_reward`` in a fresh process (a config naming it fails), yet passes tests that import it directly.
    Scanned from the source, so a new module cannot be forgotten."""
    import re
    from pathlib import Path

    import rewards

    root = Path(rewards.__file__).parent
    registering = {"rewards." + ".".join(p.relative_to(root).with_suffix("").parts)
                   for p in root.rglob("*.py") if re.search(r"^@register_reward\(", p.read_text(), re.M)}
    assert registering and registering <= set(rewards._BUILTIN_MODULES), registering - set(rewards._BUILTIN_MODULES)


def test_every_reward_with_a_dtype_option_refuses_an_unknown_one_in_one_line():
    """Found from the rewards' signatures, not a list: pickscore, clip_score, aesthetic and geneval raised a bare
    KeyError (a traceback in ``diffrl score``) before every reward read its dtype through one helper."""
    import inspect

    from rewards import available_rewards

    with_dtype = [name for name, entry in available_rewards().items()
                  if "dtype" in inspect.signature(entry.factory).parameters]
    assert {"pickscore", "clip_score", "aesthetic", "geneval", "imagereward", "hpsv3"} <= set(with_dtype)
    for name in with_dtype:
        with pytest.raises(RewardError, match=rf"^{name} dtype 'fp8': choose float32, bfloat16, float16$"):
            load_reward(name, kwargs={name: {"dtype": "fp8"}})
