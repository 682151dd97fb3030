import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from diffrl.curriculum import UniformSampler
from diffrl.errors import CheckpointError
from diffrl.training import checkpoints, engine, run_setup


@pytest.fixture
def parts():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def save_model(model):
    def save(folder, full_state):
        assert full_state is None  # only a sharded module is gathered
        folder.mkdir()
        torch.save(model.state_dict(), folder / "weights.pt")
    return save


def load_model(model):
    return lambda folder: model.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))


def test_checkpoint_round_trip_restores_everything(tmp_path, parts):
    model, optimizer, scheduler = parts
    acc = Accelerator(cpu=True)
    sampler = UniformSampler(10, 3, seed=1)
    sampler.next_indices()
    noise = torch.Generator().manual_seed(5)
    torch.rand(3, generator=noise)
    checkpoints.save_checkpoint(acc, tmp_path, 7, trainer="t", module=model, save_model=save_model(model),
                                optimizer=optimizer,
                                scheduler=scheduler, states={"sampler": sampler}, generators={"noise": noise})
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=noise).item(),
                sampler.next_indices())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = optimizer.state[model.weight]["exp_avg"].clone()

    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # scramble everything
    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    sampler2, noise2 = UniformSampler(10, 3, seed=1), torch.Generator().manual_seed(0)
    folder = checkpoints.resolve_resume(tmp_path, "latest")
    assert folder == tmp_path / "checkpoints" / "step-000007"
    info = checkpoints.load_checkpoint(folder, acc, trainer="t", module=model2, load_model=load_model(model2),
                                       optimizer=opt2,
                                       scheduler=sched2, states={"sampler": sampler2}, generators={"noise": noise2})
    assert info["step"] == 7
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, weights[k])
    torch.testing.assert_close(opt2.state[model2.weight]["exp_avg"], exp_avg)
    assert sched2.get_last_lr() == [0.05]
    got = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=noise2).item(),
           sampler2.next_indices())
    assert got == expected


def test_optimizer_state_is_keyed_by_parameter_name_and_old_index_keyed_files_still_load(tmp_path, parts):
    model, optimizer, scheduler = parts
    acc = Accelerator(cpu=True)
    folder = checkpoints.save_checkpoint(acc, tmp_path, 1, trainer="t", module=model, save_model=save_model(model),
                                         optimizer=optimizer, scheduler=scheduler)
    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    assert sorted(saved["state"]) == ["bias", "weight"] and saved["param_groups"][0]["params"] == ["weight", "bias"]
    torch.testing.assert_close(saved["state"]["bias"]["exp_avg"], optimizer.state[model.bias]["exp_avg"])
    # a checkpoint from before the name-keyed format (optimizer.state_dict() as is) loads unchanged
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    checkpoints.load_checkpoint(folder, acc, trainer="t", module=model2, load_model=load_model(model2),
                                optimizer=opt2, scheduler=torch.optim.lr_scheduler.StepLR(opt2, step_size=1))
    torch.testing.assert_close(opt2.state[model2.weight]["exp_avg"], optimizer.state[model.weight]["exp_avg"])
    # and one written for other weights is refused in one line
    saved["param_groups"][0]["params"] = ["weight", "other.bias"]
    torch.save(saved, folder / "optimizer.pt")
    with pytest.raises(CheckpointError, match="optimizer.pt does not fit this run's trained weights"):
        checkpoints.load_checkpoint(folder, acc, trainer="t", module=model2, load_model=load_model(model2),
                                    optimizer=opt2, scheduler=torch.optim.lr_scheduler.StepLR(opt2, step_size=1))


def test_half_written_checkpoints_are_ignored_and_old_ones_pruned(tmp_path, parts):
    model, optimizer, scheduler = parts
    acc = Accelerator(cpu=True)
    for step in (1, 2, 3):
        checkpoints.save_checkpoint(acc, tmp_path, step, trainer="t", module=model, save_model=save_model(model),
                                optimizer=optimizer,
                                    scheduler=scheduler, keep_last=2)
    # A kill during a write leaves a .tmp folder, and a folder without trainer_state.json is never "latest".
    (tmp_path / "checkpoints" / ".tmp-step-000004").mkdir()
    (tmp_path / "checkpoints" / "step-000005").mkdir()
    names = [p.name for p in checkpoints.list_checkpoints(tmp_path)]
    assert names == ["step-000002", "step-000003"]
    assert checkpoints.resolve_resume(tmp_path, "latest").name == "step-000003"
    # Writing step 4 again replaces the stale temp folder.
    checkpoints.save_checkpoint(acc, tmp_path, 4, trainer="t", module=model, save_model=save_model(model),
                                optimizer=optimizer,
                                scheduler=scheduler)
    assert not (tmp_path / "checkpoints" / ".tmp-step-000004").exists()
    assert checkpoints.resolve_resume(tmp_path, "latest").name == "step-000004"


def test_resume_of_a_fresh_run_starts_from_scratch(tmp_path):
    assert checkpoints.resolve_resume(tmp_path, "latest") is None
    assert checkpoints.resolve_resume(tmp_path, None) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoints.resolve_resume(tmp_path, str(tmp_path / "nope"))


@pytest.mark.parametrize("damage, message", [
    ("trainer", "was written by the 'other' trainer, not 't'"),
    ("missing", "is missing optimizer.pt"),
    ("incomplete", "is not a complete checkpoint"),
    ("corrupt_json", "trainer_state.json is corrupt"),
    ("pickle", "cannot be loaded safely"),
    ("processes", "was written by 4 processes, this run has 1"),
])
def test_bad_checkpoints_are_refused_with_the_reason(tmp_path, parts, damage, message):
    model, optimizer, scheduler = parts
    acc = Accelerator(cpu=True)
    folder = checkpoints.save_checkpoint(acc, tmp_path, 1, trainer="t", module=model, save_model=save_model(model),
                                         optimizer=optimizer, scheduler=scheduler)
    state = json.loads((folder / "trainer_state.json").read_text())
    if damage == "trainer":
        state["trainer"] = "other"
    if damage == "processes":
        state["num_processes"] = 4
    (folder / "trainer_state.json").write_text(json.dumps(state))
    if damage == "missing":
        (folder / "optimizer.pt").unlink()
    if damage == "incomplete":
        (folder / "trainer_state.json").unlink()
    if damage == "corrupt_json":
        (folder / "trainer_state.json").write_text("{not json")
    if damage == "pickle":
        # A pickle that would run code on load: weights_only=True must refuse it.
        class Evil:
            def __reduce__(self):
                return (print, ("pwned",))
        (folder / "optimizer.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match=message):
        checkpoints.load_checkpoint(folder, acc, trainer="t", module=model, load_model=load_model(model),
                                    optimizer=optimizer,
                                    scheduler=scheduler)


def test_metrics_log_truncates_rows_after_the_resumed_step(tmp_path):
    acc = Accelerator(cpu=True)
    log = engine.MetricsLogger(acc, tmp_path, trackers=False)
    for step in (1, 2, 3):
        log.log({"loss": torch.tensor(step * 1.0), "bad": float("nan")}, step=step)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # a row cut by a kill
    engine.MetricsLogger(acc, tmp_path, resume_step=2, trackers=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 1.0, "bad": "nan"}, {"step": 2, "loss": 2.0, "bad": "nan"}]


def test_unwritable_output_dir_is_one_line(tmp_path):
    from diffrl.config import from_dict
    from diffrl.errors import ConfigError
    from diffrl.trainers.dllm_sft import DllmSFTConfig

    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = from_dict(DllmSFTConfig, {"trainer": "dllm_sft", "model": {"path": "x"}, "output_dir": str(blocker / "run")})
    with pytest.raises(ConfigError, match="is not writable"):
        run_setup.prepare_output_dir(Accelerator(cpu=True), cfg)


def test_a_time_stamped_output_dir_gives_each_run_its_own_folder(tmp_path, tiny_dir):
    """The quickstarts' ``output_dir: outputs/quickstart/{time}``: ``make demo`` twice in a row runs twice."""
    from diffrl.api import train

    results = [train("configs/dllm_sft/tiny_arithmetic.yaml", [
        f"model.path={tiny_dir('dllm')}", f"output_dir={tmp_path / 'demo' / '{time}'}", "max_steps=1",
        "data.size=24", "data.eval_size=2", "logging.progress_bar=false", "logging.trackers=[]"]) for _ in range(2)]
    first, second = (Path(r["output_dir"]) for r in results)
    assert first != second and first.parent == second.parent == tmp_path / "demo"
    assert all((folder / "checkpoints" / "step-000001").is_dir() for folder in (first, second))
    assert (tmp_path / "demo" / "latest").resolve() == second.resolve()
    assert f"output_dir: {second}" in (second / "config.yaml").read_text()


def test_time_must_be_the_last_part_of_output_dir(tmp_path):
    from diffrl.config import from_dict
    from diffrl.errors import ConfigError
    from diffrl.trainers.dllm_sft import DllmSFTConfig

    cfg = from_dict(DllmSFTConfig, {"trainer": "dllm_sft", "model": {"path": "x"},
                                    "output_dir": str(tmp_path / "{time}" / "run")})
    with pytest.raises(ConfigError, match="may only be the last part"):
        run_setup.prepare_output_dir(Accelerator(cpu=True), cfg)


def test_accumulated_micro_batches_give_the_gradient_of_the_whole_batch(tmp_path):
    """A config with gradient_accumulation_steps 4 (SePPO's and Diffusion-DPO's published configs use up to
    256): the run's accelerator must not scale losses again, so 4 micro-batches through step_guard.accumulate
    give the gradient of the mean loss over the whole batch (accelerate's own accumulation divided each loss
    by 4 a second time, shrinking the gradient 4x and keeping max_grad_norm from ever clipping)."""
    from diffrl.trainers import load_config
    from diffrl.training import step_guard

    config = load_config("configs/seppo/tiny_sd15.yaml", [f"output_dir={tmp_path}", "logging.trackers=[]",
                                                          "optim.gradient_accumulation_steps=4"])
    accelerator = run_setup.create_accelerator(config)
    torch.manual_seed(0)
    model, inputs = torch.nn.Linear(3, 1), torch.randn(8, 3)
    step_guard.accumulate(accelerator, model, 4, lambda i: (model(inputs[2 * i:2 * i + 2]).pow(2).mean(), {}))
    accumulated = model.weight.grad.clone()
    model.zero_grad()
    model(inputs).pow(2).mean().backward()
    torch.testing.assert_close(accumulated, model.weight.grad)


def test_a_checkpoint_written_before_the_prompt_sampler_rename_resumes(tmp_path, parts):
    """SePPO, Diffusion-DPO, IGPO and dLLM SFT saved their prompt sampler as state_sampler.pt before 0.2."""
    model, optimizer, scheduler = parts
    acc = Accelerator(cpu=True)
    sampler = UniformSampler(10, 3, seed=1)
    sampler.next_indices()
    checkpoints.save_checkpoint(acc, tmp_path, 3, trainer="t", module=model, save_model=save_model(model),
                                optimizer=optimizer, scheduler=scheduler, states={"sampler": sampler})
    expected = sampler.next_indices()
    resumed = UniformSampler(10, 3, seed=1)
    checkpoints.load_checkpoint(checkpoints.resolve_resume(tmp_path, "latest"), acc, trainer="t", module=model,
                                load_model=load_model(model), optimizer=optimizer, scheduler=scheduler,
                                states={"prompt_sampler": resumed})
    assert resumed.next_indices() == expected


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_files_get_the_umask_s_permissions_whatever_wrote_them(tmp_path, parts, umask):
    """safetensors creates its files 0600; a checkpoint is published with the mode the umask gives every other
    file of the run (0644 under 0022: readable by teammates on a shared cluster; 0600 under 0077)."""
    import os
    import stat

    from safetensors.torch import save_file

    model, optimizer, scheduler = parts

    def save_with_safetensors(folder, full_state):
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "w.safetensors"))

    previous = os.umask(umask)
    try:
        final = checkpoints.save_checkpoint(Accelerator(cpu=True), tmp_path, 1, trainer="t", module=model,
                                            save_model=save_with_safetensors, optimizer=optimizer,
                                            scheduler=scheduler)
    finally:
        os.umask(previous)
    files = [p for p in final.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o666 & ~umask}
    assert {stat.S_IMODE(p.stat().st_mode) for p in [final, *final.rglob("*")] if p.is_dir()} == {0o777 & ~umask}
