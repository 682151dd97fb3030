"""The bad-input catalogue: each wrong input a user can give the CLI (configs, data, prompt files, images,
videos, rewards, checkpoints, output folders) ends in exactly one ``error: ...`` line that names the problem
and the way out, with no traceback, and leaves no output that looks like a finished run. The README lists
these cases ("Bad input").
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from diffrl import cli
from diffrl.models.tiny import save_preferences
from rewards import RewardOutput, register_reward
from tests.conftest import REPO_ROOT

AWM = str(REPO_ROOT / "configs/awm/tiny_sd3_jpeg.yaml")
IGPO = str(REPO_ROOT / "configs/igpo/tiny_arithmetic.yaml")
LATIN1 = "café au lait\n".encode("latin-1")  # not UTF-8
QUICK = ["max_steps=1", "data.eval_size=1", "logging.progress_bar=false", "logging.trackers=[]"]


@register_reward("test_catalogue_wrong_shape", modality="image")
class WrongShape:
    """A broken plug-in: one score too many."""

    def __init__(self, device="cpu"):
        pass

    def __call__(self, images, prompts, **_):
        return RewardOutput(torch.zeros(len(images) + 1))


@dataclass
class Case:
    argv: Callable[[Path, Callable], list[str]]   # (tmp_path, tiny_dir) -> CLI arguments
    says: tuple[str, ...]                         # the problem and the fix, in the one line
    run_dir: str | None = "run"                   # must not look like a finished run afterwards


def awm(*overrides: str) -> Callable:
    return lambda tmp, tiny: ["train", AWM, f"model.path={tiny('sd3')}", f"output_dir={tmp / 'run'}", *QUICK,
                              *[o.format(tmp=tmp) for o in overrides]]


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _yaml(text: str) -> Callable:
    return lambda tmp, tiny: ["train", str(write(tmp / "bad.yaml", text)), f"output_dir={tmp / 'run'}"]


def _png(tmp: Path) -> Path:
    from PIL import Image

    path = tmp / "ok.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(path)
    return path


def _truncated_png(tmp: Path) -> Path:
    data = _png(tmp).read_bytes()
    return write(tmp / "images" / "cut.png", data[: len(data) // 2])


def _preferences(tmp: Path, rows: list[dict]) -> Path:
    folder = tmp / "prefs"
    write(folder / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _seppo(tmp: Path, tiny, *overrides: str) -> list[str]:
    return ["train", str(REPO_ROOT / "configs/seppo/tiny_sd15.yaml"), f"model.path={tiny('sd15')}",
            f"output_dir={tmp / 'run'}", *QUICK, *overrides]


@pytest.fixture(scope="module")
def finished_run(tiny_dir, tmp_path_factory) -> Path:
    """A real one-step AWM run with its checkpoint, for the checkpoint cases (each works on a copy)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(awm()(out.parent, tiny_dir)) == 0
    return out


def _copy_run(finished: Path, tmp: Path) -> Path:
    target = tmp / "run"
    shutil.copytree(finished, target)
    return target / "checkpoints" / "step-000001"


def _damage(change: Callable[[Path], None]) -> Callable:
    """Resume a copy of the finished run after ``change(checkpoint folder)``."""
    def argv(tmp, tiny, finished):
        change(_copy_run(finished, tmp))
        return awm("checkpoint.resume=latest", "max_steps=2")(tmp, tiny)
    return argv


def _evil_pickle(folder: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, ("/definitely/not/here",))

    (folder / "optimizer.pt").write_bytes(pickle.dumps(Evil()))


def _state(**changes) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        info = json.loads((folder / "trainer_state.json").read_text())
        (folder / "trainer_state.json").write_text(json.dumps({**info, **changes}))
    return change


CASES: dict[str, Case] = {
    # --- configs and the command line
    "config file missing": Case(lambda t, _: ["train", str(t / "nope.yaml")], ("nope.yaml", "not found"), None),
    "config not YAML": Case(_yaml("trainer: awm\nmodel: [unclosed\n"), ("YAML",), None),
    "config empty": Case(_yaml(""), ("empty",), None),
    "unknown trainer": Case(_yaml("trainer: awmm\n"), ("awmm", "awm")),
    "unknown key (typo)": Case(awm("optim.learning_rate=0.1"), ("learning_rate", "lr")),
    "wrong type": Case(awm("max_steps=ten"), ("max_steps", "ten")),
    "negative batch size": Case(awm("train_batch_size=-2"), ("train_batch_size", ">= 1")),
    "value out of choices": Case(awm("model.dtype=float64"), ("model.dtype", "float16")),
    "half-precision weights trained on CPU": Case(awm("model.dtype=float16"),
                                                  ("model.dtype float16", "CPU", "float32")),
    "override without '='": Case(awm("max_steps"), ("max_steps", "key.sub=value")),
    "unknown estimator": Case(awm("estimator=grpoo"), ("grpoo", "grpo")),
    "unknown estimator option": Case(awm("estimator_kwargs.scale=2"), ("scale", "options")),
    "groups not dividing over processes": Case(
        lambda t, tiny: awm("group_size=3", "prompts_per_step=3")(t, tiny) + ["--num-processes", "2"],
        ("9 samples", "multiple of 2")),
    "image size the model cannot make": Case(awm("sampling.height=30"), ("multiples of 4", "30")),
    "unknown rollout sampler": Case(awm("sampling.sampler=dpm"), ("sampling.sampler", "sa_solver", "dpm")),
    "unknown task generator option": Case(
        _yaml("trainer: dllm_sft\nmodel: {path: nowhere}\n"
              "data: {path: 'generator:addition', generator_options: {digit: [2]}}\n"),
        ("digit", "its options: digits")),
    "unknown accelerate config": Case(lambda t, tiny: awm()(t, tiny) + ["--accelerate-config", "zero9"],
                                      ("zero9", "shipped")),
    "DeepSpeed config without DeepSpeed": Case(lambda t, tiny: awm()(t, tiny) + ["--accelerate-config", "zero2"],
                                               ("zero2", "pip install deepspeed", "fsdp")),
    "Wan 2.2's two experts under FSDP (found in the launched processes)": Case(
        lambda t, tiny: ["train", "configs/seppo/tiny_sd15.yaml", f"model.path={tiny('wan22')}", "data.num_frames=5",
                         f"data.path={save_preferences(t / 'prefs', num_rows=2, num_frames=5)}", "reward=null",
                         f"output_dir={t / 'run'}", "data.eval_size=0", "max_steps=1", "generation.guidance_scale=1",
                         "--accelerate-config", "fsdp", "--num-processes", "2"],
        ("Wan 2.2's two experts cannot be sharded", "--accelerate-config ddp")),
    "DiffusionGemma under FSDP (found in the launched processes)": Case(
        lambda t, tiny: ["train", "configs/igpo/tiny_diffusion_gemma.yaml", f"model.path={tiny('diffusion_gemma')}",
                         f"output_dir={t / 'run'}", "max_steps=1", "data.eval_size=0",
                         "--accelerate-config", "fsdp", "--num-processes", "2"],
        ("DiffusionGemma is not sharded", "--accelerate-config ddp")),
    "FSDP version that is not a number": Case(
        lambda t, tiny: awm()(t, tiny) + ["--num-processes", "2", "--accelerate-config", str(write(
            t / "acc.yaml", "distributed_type: FSDP\nfsdp_config: {fsdp_version: two}\n"))],
        ("fsdp_config.fsdp_version", "'two'", "set it to 2")),
    "AWM's KL to the base model without LoRA": Case(awm("lora.enabled=false"), ("beta > 0", "set beta: 0")),
    "unknown ls section": Case(lambda t, _: ["ls", "trainerz"], ("trainerz", "trainers"), None),
    "a folder given as the config": Case(lambda t, _: ["train", str(t)], ("a folder", "YAML config"), None),
    "same key twice in a config": Case(_yaml("trainer: awm\nseed: 1\nseed: 2\n"), ("'seed'", "twice", "keep one")),
    "empty output_dir": Case(awm("output_dir="), ("output_dir is empty", "output_dir=outputs/")),
    "no processes": Case(lambda t, tiny: awm()(t, tiny) + ["--num-processes", "0"], ("--num-processes", "at least 1")),
    "multi-node without the main address": Case(
        lambda t, tiny: awm()(t, tiny) + ["--num-processes", "4", "--num-machines", "2"], ("--main-process-ip",)),
    "machine rank out of range": Case(
        lambda t, tiny: awm()(t, tiny) + ["--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "h"],
        ("--machine-rank 2", "0 .. 1")),
    "option given no value": Case(lambda t, tiny: awm()(t, tiny) + ["--max_steps"], ("--max_steps", "VALUE")),
    "unknown tracker": Case(awm("logging.trackers=[wandbb]"), ("wandbb", "did you mean 'wandb'")),
    "tracker not installed": Case(awm("logging.trackers=[mlflow]"), ("mlflow is not installed", "pip install mlflow")),
    "unknown LoRA target module": Case(awm("lora.target_modules=[to_q, to_qq]"), ("'to_qq' not found", "named")),
    "score on a device name torch does not know": Case(
        lambda t, _: ["score", "--images", str(_png(t)), "--reward", "jpeg_compressibility", "--device", "gpu"],
        ("--device gpu", "cpu, cuda"), None),
    "score on a GPU this machine lacks": Case(  # no GPU here: "no CUDA GPU"; with GPUs: "only N GPU(s)"
        lambda t, _: ["score", "--images", str(_png(t)), "--reward", "jpeg_compressibility", "--device", "cuda:99"],
        ("--device cuda:99", "use"), None),
    "eval batch size 0": Case(lambda t, _: ["eval", IGPO, "--batch-size", "0"], ("--batch-size", "at least 1"), None),
    # --- models and output folders
    "model folder missing": Case(lambda t, tiny: awm()(t, tiny) + [f"model.path={t / 'no-model'}"],
                                 ("no-model", "hub id")),
    "output_dir not writable": Case(lambda t, tiny: awm()(t, tiny) + [f"output_dir={write(t / 'f', 'x')}/run"],
                                    ("not writable", "output_dir="), None),
    # --- prompt files and data sets
    "prompt file missing": Case(awm("data.path={tmp}/none.txt"), ("none.txt",)),
    # found by each of two launched processes: the launcher's traceback and the second copy are dropped
    "prompt file missing, two processes": Case(
        lambda t, tiny: awm("data.path={tmp}/none.txt")(t, tiny) + ["--num-processes", "2"], ("none.txt",)),
    "prompt file empty": Case(lambda t, tiny: awm(f"data.path={write(t / 'p.txt', chr(10) * 3)}")(t, tiny),
                              ("p.txt", "no prompts")),
    "prompt file not UTF-8": Case(lambda t, tiny: awm(f"data.path={write(t / 'p.txt', LATIN1)}")(t, tiny),
                                  ("p.txt", "UTF-8")),
    "an image pipeline given to a diffusion-LM trainer": Case(
        lambda t, tiny: ["train", IGPO, f"model.path={tiny('sd3')}", f"output_dir={t / 'run'}", *QUICK],
        ("is a diffusers StableDiffusion3Pipeline folder", "igpo trains diffusion language models",
         "diffrl ls models")),
    "a language model given to an image trainer": Case(
        lambda t, tiny: awm(f"model.path={tiny('dllm')}")(t, tiny),   # the later model.path wins
        ("is a transformers", "not a diffusers pipeline", "diffrl ls models")),
    "a LoRA folder given as the model": Case(
        lambda t, tiny: awm(f"model.path={write(t / 'lora' / 'adapter_config.json', '{}').parent}")(t, tiny),
        ("is a LoRA adapter folder, not a whole model",)),
    "unknown task generator": Case(lambda t, tiny: ["train", IGPO, f"model.path={tiny('dllm')}",
                                                    f"output_dir={t / 'run'}", "data.path=generator:algebra"],
                                   ("algebra", "arithmetic")),
    "task generator option out of range": Case(lambda t, tiny: ["train", IGPO, f"model.path={tiny('dllm')}",
                                                         f"output_dir={t / 'run'}", "data.path=generator:addition",
                                                         "data.generator_options={unbraced_fraction: 1.5}"],
                                              ("unbraced_fraction must be between 0 and 1", "1.5")),
    "preference data missing a column": Case(
        lambda t, tiny: _seppo(t, tiny, f"data.path={_preferences(t, [{'image': 'a.png', 'rejected': 'b.png'}])}"),
        ("caption",)),
    "preference data with no readable row": Case(
        lambda t, tiny: _seppo(t, tiny, "data.path=" + str(_preferences(
            t, [{"caption": "x", "chosen": "gone.png", "rejected": "gone2.png"}]))),
        ("no row could be decoded", "check the image files")),
    # --- images, videos and rewards
    "truncated PNG": Case(lambda t, _: ["score", "--images", str(_truncated_png(t)), "--reward", "jpeg_compressibility",
                                        "--out", str(t / "scores.jsonl")],
                          ("nothing could be scored", "cut.png"), None),
    "zero-byte video": Case(lambda t, _: ["score", "--videos", str(write(t / "v.mp4", b"")), "--reward", "video",
                                          "--reward-kwargs", '{"video": {"image_reward": "jpeg_compressibility"}}'],
                            ("nothing could be scored", "v.mp4", "empty"), None),
    "reward options not JSON": Case(lambda t, _: ["score", "--images", str(_png(t)), "--reward",
                                                  "jpeg_compressibility", "--reward-kwargs", "{bad"],
                                    ("--reward-kwargs", "JSON"), None),
    "every reward weight zero": Case(awm("reward.weights={{jpeg_compressibility: 0}}"),
                                     ("every reward weight is 0", "non-zero weight")),
    "reward model folder missing": Case(
        lambda t, _: ["score", "--images", str(_png(t)), "--prompts", str(write(t / "p.txt", "a cat\n")),
                      "--reward", "pickscore", "--reward-kwargs",
                      json.dumps({"pickscore": {"model": str(t / "no-clip")}})],
        ("no-clip", "folder not found", "--reward-kwargs", "reward.kwargs.pickscore.model"), None),
    "reward server down": Case(awm("reward.weights={{remote: 1.0}}",
                                   "reward.kwargs={{remote: {{url: 'http://127.0.0.1:9'}}}}"),
                               ("http://127.0.0.1:9 is not reachable", "diffrl serve-reward")),
    "geneval on prompts without GenEval metadata": Case(awm("reward.weights={{geneval: 1.0}}"),
                                                        ("geneval needs each prompt's GenEval metadata", ".jsonl")),
    "GenEval metadata naming a class the detector lacks": Case(
        lambda t, tiny: awm("reward.weights={{geneval: 1.0}}", "data.path=" + str(write(
            t / "g.jsonl", json.dumps({"prompt": "a unicorn", "tag": "single_object",
                                       "include": [{"class": "unicorn", "count": 1}]}) + "\n")))(t, tiny),
        ("'unicorn' is not one of the 80 COCO classes",)),
    "reward.async on a trainer that cannot overlap": Case(
        lambda t, tiny: ["train", IGPO, f"model.path={tiny('dllm')}", f"output_dir={t / 'run'}", "reward.async=true"],
        ("reward.async", "flow trainers", "remove it")),
    "DiffusionGemma with a masked LM's block length": Case(
        lambda t, tiny: ["train", IGPO, f"model.path={tiny('diffusion_gemma')}", f"output_dir={t / 'run'}",
                         "prompt_mask_prob=0", "generation.block_length=8"],
        ("is a DiffusionGemma", "generation.block_length: 16")),
    "DiffusionGemma with prompt masking": Case(
        lambda t, tiny: ["train", IGPO, f"model.path={tiny('diffusion_gemma')}", f"output_dir={t / 'run'}",
                         "generation.block_length=16", "prompt_mask_prob=0.15"],
        ("no mask token", "prompt_mask_prob: 0")),
    "DiffusionGemma temperatures the wrong way round": Case(
        lambda t, tiny: ["train", IGPO, f"model.path={tiny('diffusion_gemma')}", f"output_dir={t / 'run'}",
                         "prompt_mask_prob=0", "generation.t_min=0.9"], ("t_max (0.8) must be above", "t_min (0.9)")),
    "DiffusionGemma SFT answers that are not whole canvases": Case(
        lambda t, tiny: ["train", str(REPO_ROOT / "configs/dllm_sft/tiny_arithmetic.yaml"),
                         f"model.path={tiny('diffusion_gemma')}", f"output_dir={t / 'run'}", "generation.gen_length=16",
                         "generation.block_length=16", "max_answer_length=20"],
        ("set max_answer_length to a multiple of 16", "it is 20")),
    "DiffusionGemma sampling settings on a masked LM": Case(
        lambda t, tiny: ["train", IGPO, f"model.path={tiny('dllm')}", f"output_dir={t / 'run'}",
                         "generation.t_max=1.0"],
        ("generation.t_max is one of DiffusionGemma's settings", "masked diffusion LM")),
    "key/value cache on DiffusionGemma": Case(
        lambda t, tiny: ["train", IGPO, f"model.path={tiny('diffusion_gemma')}", f"output_dir={t / 'run'}",
                         "prompt_mask_prob=0", "generation.block_length=16", "generation.eval.kv_cache=dual"],
        ("keeps no diffrl key/value cache", "remove generation.eval.kv_cache")),
    "key/value cache with eager attention": Case(
        lambda t, tiny: ["train", IGPO, f"model.path={tiny('dllm')}", f"output_dir={t / 'run'}",
                         "model.attention=eager", "generation.rollout.kv_cache=prefix"],
        ("generation.rollout.kv_cache runs with SDPA attention", "model.attention: sdpa")),
    "NFT without LoRA": Case(lambda t, tiny: ["train", str(REPO_ROOT / "configs/nft/tiny_sd3_jpeg.yaml"),
                                              f"model.path={tiny('sd3')}", f"output_dir={t / 'run'}", *QUICK,
                                              "lora.enabled=false"], ("second LoRA adapter", "lora.enabled: true")),
    "unknown reward": Case(awm("reward.weights.pickscor=1.0"), ("pickscor", "pickscore")),
    "reward returning the wrong shape": Case(awm("reward.weights={{test_catalogue_wrong_shape: 1.0}}"),
                                             ("test_catalogue_wrong_shape", "one score per sample")),
    "image reward on a video model": Case(lambda t, tiny: awm()(t, tiny) + [f"model.path={tiny('wan')}"],
                                          ("videos", "image_reward")),
    "plain prompts for an image-editing model": Case(
        lambda t, tiny: awm()(t, tiny) + [f"model.path={tiny('flux_kontext')}"],
        ("FluxKontextPipeline takes an input image", "metadata.jsonl rows hold 'prompt' and 'image'")),
    "editing prompt folder naming a missing image": Case(
        lambda t, tiny: awm()(t, tiny) + [f"model.path={tiny('flux_kontext')}", "data.path=" + str(write(
            t / "edits" / "metadata.jsonl", json.dumps({"prompt": "make it red", "image": "gone.png"}) + "\n").parent)],
        ("metadata.jsonl:1: image 'gone.png' not found",)),
    "model.pipeline that is not a flow pipeline": Case(
        lambda t, tiny: awm()(t, tiny) + [f"model.path={tiny('wan')}", "model.pipeline=WanVideoPipeline"],
        ("'WanVideoPipeline' is not a flow pipeline diffrl knows", "WanImageToVideoPipeline")),
    "preference trainer on an image-editing model": Case(
        lambda t, tiny: _seppo(t, tiny, f"model.path={tiny('flux_kontext')}", f"data.path={tiny('preferences')}"),
        ("takes input images", "awm, nft or flow_grpo")),
    "prompts that do not fit the reward": Case(awm("reward.weights={{ocr: 1.0}}"), ("ocr", "double quotes")),
    "ocr reward mode misspelled": Case(awm("reward.weights={{ocr: 1.0}}", "reward.kwargs={{ocr: {{mode: recognise}}}}"),
                                       ("mode must be 'detect' or 'recognize'", "recognise")),
    # --- checkpoints
    "resume folder missing": Case(awm("checkpoint.resume={tmp}/checkpoints/step-000007"), ("does not exist", "latest")),
}

CHECKPOINT_CASES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "checkpoint from another trainer": (_state(trainer="flow_grpo"), ("flow_grpo", "awm")),
    "checkpoint with a missing file": (lambda f: (f / "optimizer.pt").unlink(), ("missing optimizer.pt", "earlier")),
    "checkpoint state file corrupt": (lambda f: (f / "trainer_state.json").write_text("{"), ("corrupt", "earlier")),
    "checkpoint from another process count": (_state(num_processes=2), ("2 processes", "same number")),
    "checkpoint holding a malicious pickle": (_evil_pickle, ("cannot be loaded safely",)),
    "checkpoint weights truncated": (
        lambda f: write(f / "model" / "pytorch_lora_weights.safetensors", b"\x00" * 10),
        ("model cannot be loaded", "earlier")),
}


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1, err[-2000:]
    return errors[0]


def _looks_unfinished(run: Path, checkpoints_before: int = 0) -> None:
    complete = list(run.glob("checkpoints/step-*/trainer_state.json"))
    assert len(complete) == checkpoints_before, complete
    metrics = run / "metrics.jsonl"
    if checkpoints_before == 0 and metrics.exists():  # at most the evaluation before training, no step
        assert all(json.loads(line)["step"] == 0 for line in metrics.read_text().splitlines())


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line(name, tmp_path, tiny_dir, capsys):
    case = CASES[name]
    line = _one_line_error(capsys, cli.main(case.argv(tmp_path, tiny_dir)))
    for words in case.says:
        assert words in line, line
    if case.run_dir:
        _looks_unfinished(tmp_path / case.run_dir)
    assert not (tmp_path / "scores.jsonl").exists()  # no score table for a failed scoring run


@pytest.mark.parametrize("name", list(CHECKPOINT_CASES))
def test_bad_checkpoint_is_one_clear_line(name, tmp_path, tiny_dir, finished_run, capsys):
    change, says = CHECKPOINT_CASES[name]
    argv = _damage(change)(tmp_path, tiny_dir, finished_run)
    line = _one_line_error(capsys, cli.main(argv))
    for words in says:
        assert words in line, line
    _looks_unfinished(tmp_path / "run", checkpoints_before=1)
    assert not (tmp_path / "run" / "checkpoints" / "step-000002").exists()


def test_a_new_run_refuses_to_overwrite_another_runs_checkpoints(tmp_path, tiny_dir, finished_run, capsys):
    _copy_run(finished_run, tmp_path)
    line = _one_line_error(capsys, cli.main(awm("max_steps=2")(tmp_path, tiny_dir)))
    assert "already holds checkpoints" in line and "checkpoint.resume=latest" in line


def test_the_catalogue_has_at_least_25_cases():
    assert len(CASES) + len(CHECKPOINT_CASES) + 1 >= 25


def test_resuming_with_changed_maths_names_the_keys_and_needs_a_flag(tmp_path, tiny_dir, finished_run, capsys):
    _copy_run(finished_run, tmp_path)
    resume = awm("checkpoint.resume=latest", "max_steps=2", "optim.lr=0.5", "seed=7")
    line = _one_line_error(capsys, cli.main(resume(tmp_path, tiny_dir)))
    assert "optim.lr, seed" in line and "checkpoint.allow_changes=true" in line
    _looks_unfinished(tmp_path / "run", checkpoints_before=1)
    # a longer run (max_steps) is not a change of the maths; with the flag the changed run goes on
    assert cli.main(awm("checkpoint.resume=latest", "max_steps=2", "optim.lr=0.5",
                        "checkpoint.allow_changes=true")(tmp_path, tiny_dir)) == 0
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.json").is_file()


def test_a_checkpoint_of_another_lora_rank_is_named_as_such(tmp_path, tiny_dir, finished_run, capsys):
    _copy_run(finished_run, tmp_path)
    resume = awm("checkpoint.resume=latest", "max_steps=2", "lora.rank=3", "checkpoint.allow_changes=true")
    line = _one_line_error(capsys, cli.main(resume(tmp_path, tiny_dir)))
    assert "another model or LoRA setting" in line and "lora.rank" in line and "earlier" not in line
    _looks_unfinished(tmp_path / "run", checkpoints_before=1)
