import dataclasses
import re

import pytest
import yaml

from diffrl.config import describe, from_dict
from diffrl.config_files import apply_overrides, save_config
from diffrl.errors import ConfigError
from diffrl.trainers import load_config
from diffrl.trainers.dllm_sft import DllmSFTConfig


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


BASE = {"trainer": "dllm_sft", "model": {"path": "some/model"}}


def test_yaml_maps_onto_nested_dataclasses_with_defaults(tmp_path):
    path = write(tmp_path, {**BASE, "optim": {"lr": "1e-4"}, "lora": {"rank": 4}, "max_steps": 7})
    cfg = load_config(path)
    assert isinstance(cfg, DllmSFTConfig)
    assert cfg.optim.lr == 1e-4  # YAML reads 1e-4 as a string; the float field converts it
    assert cfg.lora.rank == 4 and cfg.lora.alpha == 64.0
    assert cfg.max_steps == 7 and cfg.data.path == "generator:arithmetic"


def test_overrides_convert_types_and_create_sections(tmp_path):
    path = write(tmp_path, BASE)
    cfg = load_config(path, ["optim.lr=0.5", "lora.enabled=false", "logging.trackers=[]", "seed=3",
                             "optim.betas=[0.8, 0.9]", "model.revision=main"])
    assert cfg.optim.lr == 0.5 and cfg.lora.enabled is False and cfg.logging.trackers == []
    assert cfg.seed == 3 and cfg.optim.betas == [0.8, 0.9] and cfg.model.revision == "main"


def test_yaml_no_is_the_string_no_for_choice_fields(tmp_path):
    path = write(tmp_path, "trainer: dllm_sft\nmodel: {path: x}\nmixed_precision: no\n")
    assert load_config(path).mixed_precision == "no"


def test_overrides_do_not_mutate_input():
    data = {"a": {"b": 1}}
    out = apply_overrides(data, ["a.b=2", "a.c=x"])
    assert data == {"a": {"b": 1}} and out == {"a": {"b": 2, "c": "x"}}


@pytest.mark.parametrize("data, overrides, message", [
    ({**BASE, "optim": {"lrr": 1}}, [], "c.yaml: unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    ({**BASE, "max_step": 3}, [], "c.yaml: unknown key 'max_step'; did you mean 'max_steps'?"),
    (BASE, ["lora.rnak=3"], "c.yaml: unknown key 'lora.rnak'; did you mean 'lora.rank'?"),
    ({**BASE, "max_steps": "ten"}, [], "c.yaml: max_steps must be an integer, got 'ten'"),
    ({**BASE, "max_steps": 1.5}, [], "c.yaml: max_steps must be an integer, got 1.5"),
    ({**BASE, "batch_size": -2}, [], "c.yaml: batch_size must be >= 1, got -2"),
    ({**BASE, "optim": {"lr": 0}}, [], "c.yaml: optim.lr must be > 0, got 0.0"),
    ({**BASE, "lora": {"enabled": "yes"}}, [], "c.yaml: lora.enabled must be true or false, got 'yes'"),
    ({**BASE, "mixed_precision": "bf17"}, [], "c.yaml: mixed_precision must be one of 'no', 'bf16', 'fp16', "
                                              "got 'bf17'; did you mean 'bf16'?"),
    ({**BASE, "optim": 3}, [], "c.yaml: optim must be a mapping of OptimConfig fields, got 3"),
    ({"trainer": "igpo", "model": {"path": "x"}, "log_prob_estimator": "coupld"}, [],
     "c.yaml: log_prob_estimator must be one of 'd1', 'coupled', 'trace', got 'coupld'"),
    ({"trainer": "dllm_sft"}, [], "c.yaml: missing required key 'model'"),
    ({**BASE, "trainer": "dlm_sft"}, [], "c.yaml: unknown trainer 'dlm_sft'; did you mean 'dllm_sft'?"),
    ({"model": {"path": "x"}}, [], "c.yaml: missing 'trainer:' key"),
    (BASE, ["max_steps"], "c.yaml: override 'max_steps' must look like key.sub=value"),
    ({**BASE, "data": {"size": 10, "eval_size": 10}}, [], "c.yaml: data.eval_size (10) must be smaller than"),
])
def test_bad_configs_give_one_line_errors(tmp_path, data, overrides, message):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    text = str(info.value).replace(str(tmp_path) + "/", "")
    assert text.startswith(message), text
    assert "\n" not in text


@pytest.mark.parametrize("content, message", [
    ("", "the file is empty"),
    ("- a\n- b\n", "expected a mapping of keys at the top level, got list"),
    ("trainer: [unclosed\n", "invalid YAML at line"),
])
def test_bad_files(tmp_path, content, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, content))


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "latin.yaml"
    bad.write_bytes(b"trainer: dllm_sft\nmodel: {path: caf\xe9}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["optim.lr=0.01"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_every_field_is_documented():
    rows = describe(DllmSFTConfig)
    assert len(rows) > 30
    undocumented = [key for key, _, _, help_text in rows if not help_text]
    assert undocumented == []


def test_from_dict_defaults_are_not_shared():
    a = from_dict(DllmSFTConfig, dict(BASE))
    b = from_dict(DllmSFTConfig, dict(BASE))
    a.optim.betas.append(1.0)
    assert b.optim.betas == [0.9, 0.999]


def test_a_field_named_by_a_python_keyword_is_written_and_read_by_its_yaml_key(tmp_path):
    from diffrl.trainers.awm import AWMConfig

    data = {"trainer": "awm", "model": {"path": "m"}, "data": {"path": "p.txt"},
            "reward": {"weights": {"jpeg_compressibility": 1.0}, "async": True}}
    cfg = load_config(write(tmp_path, data))
    assert isinstance(cfg, AWMConfig) and cfg.reward.async_ is True
    assert load_config(write(tmp_path, data), ["reward.async=false"]).reward.async_ is False
    save_config(cfg, tmp_path / "out" / "config.yaml")
    written = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert written["reward"]["async"] is True and "async_" not in written["reward"]
    assert load_config(tmp_path / "out" / "config.yaml").reward.async_ is True
    assert "reward.async" in [row[0] for row in describe(AWMConfig)]
    with pytest.raises(ConfigError, match="unknown key 'reward.asynch'; did you mean 'reward.async'"):
        load_config(write(tmp_path, data), ["reward.asynch=true"])
    with pytest.raises(ConfigError, match="unknown key 'reward.async_'"):   # the Python name is not a YAML key
        load_config(write(tmp_path, data), ["reward.async_=true"])


@pytest.mark.parametrize("old, new", [("temperature", "rollout.temperature"),
                                      ("eval_temperature", "eval.temperature"),
                                      ("parallel_threshold", "rollout.parallel_threshold"),
                                      ("eval_kv_cache", "eval.kv_cache")])
def test_a_moved_key_names_its_new_place(tmp_path, old, new):
    """A config written before the decoding settings became generation.rollout / generation.eval: each old key
    is one line naming the new one, from a file and from the command line."""
    data = {"trainer": "igpo", "model": {"path": "m"}, "generation": {"gen_length": 32, old: 0.5}}
    message = f"'generation.{old}' is now 'generation.{new}'"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, data))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, {"trainer": "igpo", "model": {"path": "m"}}), [f"generation.{old}=0.5"])


def test_one_decoding_section_serves_rollouts_and_evaluation(tmp_path):
    cfg = load_config(write(tmp_path, {"trainer": "igpo", "model": {"path": "m"},
                                       "generation": {"rollout": {"temperature": 1.2}, "eval": {"kv_cache": "dual"}}}))
    assert (cfg.generation.rollout.temperature, cfg.generation.rollout.kv_cache) == (1.2, None)
    assert (cfg.generation.eval.temperature, cfg.generation.eval.kv_cache) == (0.0, "dual")
    assert type(cfg.generation.rollout) is type(cfg.generation.eval)


@pytest.mark.parametrize("trainer, old", [("igpo", "num_iterations"), ("nft", "optimizer_steps_per_rollout")])
def test_updates_per_rollout_has_one_name(tmp_path, trainer, old):
    data = {"trainer": trainer, "model": {"path": "m"}, "data": {"path": "p.txt"},
            "reward": {"weights": {"jpeg_compressibility": 1.0}}, old: 2}
    with pytest.raises(ConfigError, match=re.escape(f"'{old}' is now 'updates_per_rollout'")):
        load_config(write(tmp_path, data))
    data.pop(old)
    assert load_config(write(tmp_path, data), ["updates_per_rollout=2"]).updates_per_rollout == 2


def test_every_default_section_holds_its_own_sections_not_dicts():
    """A section's default (``param(Section())``) is copied per config; its own sections (data.curriculum) must
    stay dataclasses, in every trainer's config."""
    import dataclasses
    import typing

    from diffrl.trainers import available_trainers

    def walk(obj, path):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(hints.get(f.name)):
                assert isinstance(value, hints[f.name]), f"{path}{f.name} is {type(value).__name__}"
                walk(value, f"{path}{f.name}.")
            elif hints.get(f.name) is not None and isinstance(value, dict):
                assert typing.get_origin(hints[f.name]) is dict or hints[f.name] in (dict, typing.Any), path + f.name

    seen = 0
    for name, entry in available_trainers().items():
        for f in dataclasses.fields(entry.config_class):
            if f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
                if dataclasses.is_dataclass(value):
                    walk(value, f"{name}: {f.name}.")
                    seen += 1
    assert seen > 10
