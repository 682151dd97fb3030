import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run_cli


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("train", "validate", "ls", "sample", "score", "eval"):
        assert command in result.stdout


def test_version():
    import diffrl

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"diffrl {diffrl.__version__}"
    assert diffrl.__version__.count(".") >= 2


def test_ls_lists_trainers_and_configs():
    result = run_cli("ls")
    assert result.returncode == 0, result.stderr
    assert "dllm_sft" in result.stdout and "arxiv.org/abs/2502.09992" in result.stdout
    assert "configs/quickstart.yaml" in result.stdout
    models = result.stdout.split("models:")[1].split("estimators:")[0]
    assert all(name in models for name in ("DiffusionGemmaForBlockDiffusion", "masked diffusion LM", "SDARForCausalLM"))
    assert "StableDiffusion3Pipeline" in models and "AnimateDiffPipeline" in models
    for name, paper in [("grpo", "2402.03300"), ("bnpo", "2506.02864"), ("ngrpo", "2509.18851"),
                        ("spo", "2509.13232"), ("dump", "2504.09710"), ("seq-mean-token-sum-norm", ""),
                        ("drpo_loss", "2510.04474")]:
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(name + " "))
        assert paper in line


def test_ls_rejects_unknown_section():
    result = run_cli("ls", "trainerz")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: diffrl ls: unknown section 'trainerz'")


def test_validate_every_shipped_config():
    configs = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "configs").rglob("*.yaml"))
    assert "configs/quickstart.yaml" in configs
    result = run_cli("validate", *configs)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok: ") == len(configs)


def test_validate_reports_first_bad_file_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: dllm_sft\nmodel: {path: x}\noptim: {lrr: 1}\n")
    result = run_cli("validate", "configs/dllm_sft/tiny_arithmetic.yaml", str(bad))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {bad}: unknown key 'optim.lrr'; did you mean 'optim.lr'?"
    assert "Traceback" not in result.stderr


def test_train_tiny_config_two_steps(tmp_path, tiny_dir):
    out = tmp_path / "run"
    result = run_cli("train", "configs/dllm_sft/tiny_arithmetic.yaml", f"model.path={tiny_dir('dllm')}",
                     f"output_dir={out}",
                     "max_steps=2", "data.eval_size=2", "logging.progress_bar=false")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("done: loss=")
    start = re.search(r"dllm_sft: ([\d,]+) trainable parameters, 1 process\(es\) on cpu, batch (\d+) per step, "
                      r"output (.+), fresh start", result.stderr)
    assert start and int(start[1].replace(",", "")) > 0 and start[3] == str(out), result.stderr[:2000]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "step-000002" / "trainer_state.json").is_file()


def test_train_misspelt_override_is_one_line(tmp_path):
    result = run_cli("train", "configs/dllm_sft/tiny_arithmetic.yaml", "optim.lrr=1")
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: configs/dllm_sft/tiny_arithmetic.yaml: unknown key 'optim.lrr'; did you "
                                     "mean 'optim.lr'?")


def test_train_missing_model_folder_is_one_line(tmp_path):
    result = run_cli("train", "configs/dllm_sft/tiny_arithmetic.yaml", f"model.path={tmp_path / 'missing'}",
                     f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 1
    assert result.stderr.startswith("error: model.path") and "Traceback" not in result.stderr


def test_sample_a_tiny_image_run_then_score_its_output(tmp_path, tiny_dir, capsys):
    from diffrl import cli

    run = tmp_path / "run"
    assert cli.main(["train", "configs/awm/tiny_sd3_jpeg.yaml", f"model.path={tiny_dir('sd3')}", f"output_dir={run}",
                     "max_steps=1", "data.eval_size=1", "logging.trackers=[]", "logging.progress_bar=false"]) == 0
    argv = ["sample", str(run), "--prompt", "a red circle", "--prompt", "a blue square", "--num", "2",
            "sampling.eval_num_steps=3"]
    assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert "checkpoints/step-000001" in capsys.readouterr().out
    images = sorted((tmp_path / "a" / "samples").glob("*.png"))
    assert [p.name for p in images] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    rows = [json.loads(line) for line in (tmp_path / "a" / "samples" / "metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert (tmp_path / "a" / "grid.png").is_file()
    assert images[0].read_bytes() != images[1].read_bytes()  # two samples of one prompt differ
    assert cli.main([*argv, "--out", str(tmp_path / "b")]) == 0  # the same seed: the same pictures
    assert images[3].read_bytes() == (tmp_path / "b" / "samples" / "00003.png").read_bytes()
    assert cli.main(["score", "--images", str(tmp_path / "a" / "samples"), "--reward", "jpeg_compressibility",
                     "--out", str(tmp_path / "scores.jsonl"), "--quiet"]) == 0
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(scored) == 4 and all("reward" in r for r in scored) and scored[2]["prompt"] == "a blue square"
    # image evaluation: base and checkpoint on the same prompts and noise, the run's reward plus another
    (tmp_path / "p.txt").write_text("a red circle\na blue square\na green star\n")
    capsys.readouterr()
    assert cli.main(["eval", str(run), "sampling.eval_num_steps=2", "--checkpoint", str(run / "checkpoints" /
                     "step-000001"), "--prompts", str(tmp_path / "p.txt"), "--reward",
                     "jpeg_compressibility,jpeg_incompressibility=0", "--out", str(tmp_path / "ev")]) == 0
    table = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert table == json.loads((tmp_path / "ev" / "eval.json").read_text())
    # the rewards' per-sample measures come beside their scores (the JPEG size each reward is computed from)
    assert table["prompts"] == 3 and set(table["base"]) == {"eval/reward", "eval/reward/jpeg_compressibility",
                                                            "eval/reward/jpeg_incompressibility",
                                                            "eval/jpeg_compressibility/kilobytes",
                                                            "eval/jpeg_incompressibility/kilobytes"}
    assert table["base"]["eval/jpeg_compressibility/kilobytes"] == pytest.approx(
        -500 * table["base"]["eval/reward/jpeg_compressibility"])   # reward = -kB / 500 (DDPO's scale)
    assert table["gain"] == table["checkpoint"]["eval/reward"] - table["base"]["eval/reward"]
    assert (tmp_path / "ev" / "base.png").is_file() and (tmp_path / "ev" / "checkpoint.png").is_file()
    from diffrl.image_eval import eval_prompts

    shapes = (REPO_ROOT / "assets" / "prompts" / "shapes.txt").read_text().split("\n")
    assert eval_prompts(None, "shapes").prompts == [p for p in shapes if p.strip()]  # a shipped set by name


def test_sample_a_text_checkpoint_writes_jsonl(tmp_path, tiny_dir, capsys):
    from diffrl import cli

    run = tmp_path / "run"
    assert cli.main(["train", "configs/dllm_sft/tiny_arithmetic.yaml", f"model.path={tiny_dir('dllm')}",
                     f"output_dir={run}", "max_steps=1", "data.eval_size=1", "logging.progress_bar=false"]) == 0
    checkpoint = run / "checkpoints" / "step-000001"
    assert cli.main(["sample", str(checkpoint), "--prompt", "2+3", "--num", "3", "--temperature", "1.0",
                     "--out", str(tmp_path / "t")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "t" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["2+3"] * 3 and all(isinstance(r["text"], str) for r in rows)
    # sharing, offline: the folder `diffrl push` would upload
    assert cli.main(["push", str(run), "me/tiny-addition", "--folder", str(tmp_path / "share")]) == 0
    card = (tmp_path / "share" / "README.md").read_text()
    front = card.split("---")[1]
    assert f"base_model: {tiny_dir('dllm')}" in front and "- dllm_sft" in front
    assert "library_name: transformers" in front
    assert "of step 1" in card and "| step | eval/accuracy |" in card and "| 0 |" in card and "| 1 |" in card
    assert "AutoModelForMaskedLM.from_pretrained(\"me/tiny-addition\")" in card
    assert (tmp_path / "share" / "model.safetensors").is_file() and (tmp_path / "share" / "config.yaml").is_file()
    assert (tmp_path / "share" / "tokenizer_config.json").is_file()  # a full fine-tune carries its tokenizer
    capsys.readouterr()
    assert cli.main(["push", str(run), "me/x", "--folder", str(tmp_path / "share")]) == 1
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["sample", str(tmp_path), "--prompt", "x"]) == 1
    assert "not a run folder" in capsys.readouterr().err
    assert cli.main(["sample", str(checkpoint), "--prompt", "x", "--weights", "ema"]) == 1
    assert "no weight EMA" in capsys.readouterr().err


def test_overrides_are_accepted_after_options_and_in_hf_style():
    from diffrl.cli import parse_args

    args = parse_args(["train", "c.yaml", "a=1", "--num-processes", "2", "b.c=2", "--max_steps", "10",
                       "--optim.lr=3e-4", "--max-grad-norm", "-1"])
    assert args.num_processes == 2
    assert args.overrides == ["a=1", "b.c=2", "max_steps=10", "optim.lr=3e-4", "max_grad_norm=-1"]
    args = parse_args(["eval", "c.yaml", "--k", "8", "generation.rollout.temperature=1.0"])
    assert (args.k, args.overrides) == (8, ["generation.rollout.temperature=1.0"])


def test_validate_takes_overrides_as_train_does(capsys):
    from diffrl import cli

    config = str(REPO_ROOT / "configs/dllm_sft/tiny_arithmetic.yaml")
    assert cli.main(["validate", config, "max_steps=3"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    assert cli.main(["validate", config, "max_steps=ten"]) == 1  # the override is read, not taken for a file
    err = capsys.readouterr().err
    assert "max_steps" in err and "ten" in err and "not found" not in err


def test_ls_a_trainer_prints_every_field_with_type_range_default_and_help(capsys):
    from diffrl import cli
    from diffrl.config import describe
    from diffrl.trainers.igpo import IGPOConfig

    assert cli.main(["ls", "igpo"]) == 0
    out = capsys.readouterr().out
    assert "model.path" in out and "default (required)" in out
    assert "  max_bad_steps" in out and "int (>= 1)  default 5" in out
    assert "prompt_mask_prob" in out and "float (>= 0, < 1)  default 0.15" in out
    assert all(f"  {key} " in out and text in out for key, _, _, text in describe(IGPOConfig))


def test_a_hub_id_without_network_fails_at_once_not_after_retries(tmp_path):
    import os
    import subprocess
    import sys
    import time

    # HF_ENDPOINT on a closed local port stands for a machine with no route to the hub.
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), PYTHONWARNINGS="ignore")
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "a.png")
    (tmp_path / "prompts.txt").write_text("a red square\n")
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "diffrl.cli", "score", "--reward", "pickscore", "--images",
                             str(tmp_path / "a.png"), "--prompts", str(tmp_path / "prompts.txt"), "--reward-kwargs",
                             '{"pickscore": {"model": "nobody/no-clip"}}'], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert time.time() - start < 60, result.stderr[-2000:]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "127.0.0.1 cannot be reached" in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "nobody/no-clip" in error[0] and "offline" in error[0], result.stderr[-2000:]


def test_multi_node_launch_command(capsys):
    from diffrl import cli

    argv = ["train", "configs/quickstart.yaml", "max_steps=5", "--num-processes", "16", "--num-machines", "2",
            "--machine-rank", "1", "--main-process-ip", "10.0.0.1", "--accelerate-config", "ddp",
            "--print-launch", "seed=3"]
    assert cli.main(argv) == 0
    cmd = capsys.readouterr().out.split()
    after = {flag: cmd[cmd.index(flag) + 1] for flag in ("--num_processes", "--num_machines", "--machine_rank",
                                                         "--main_process_ip", "--main_process_port", "--config_file")}
    assert after == {"--num_processes": "16", "--num_machines": "2", "--machine_rank": "1",
                     "--main_process_ip": "10.0.0.1", "--main_process_port": "29500",
                     "--config_file": str(REPO_ROOT / "diffrl" / "accelerate_configs" / "ddp.yaml")}
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[-6:] == ["-m", "diffrl.cli", "train", "configs/quickstart.yaml", "max_steps=5", "seed=3"]


def test_the_slurm_script_launches_every_node_with_its_rank(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "SLURM_NNODES": "2",
           "SLURM_NODEID": "1", "MAIN_ADDR": "10.1.2.3", "GPUS_PER_NODE": "4", "ACCELERATE_CONFIG": "ddp",
           "CONFIG": "configs/quickstart.yaml", "EXTRA": "max_steps=7 optim.lr=1e-4"}
    result = subprocess.run(["bash", "scripts/slurm/train.sbatch", "--on-node", "--print-launch"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    cmd = result.stdout.split()
    assert cmd[cmd.index("--num_processes") + 1] == "8" and cmd[cmd.index("--machine_rank") + 1] == "1"
    assert cmd[cmd.index("--num_machines") + 1] == "2" and cmd[cmd.index("--main_process_ip") + 1] == "10.1.2.3"
    assert cmd[cmd.index("train"):] == ["train", "configs/quickstart.yaml", "checkpoint.resume=latest", "max_steps=7",
                                        "optim.lr=1e-4"]


def test_relay_keeps_progress_bars_and_one_copy_of_an_error_line():
    """What `diffrl train --num-processes N` shows of its processes' standard error: everything as it comes,
    until one process stops with an error line; then no second copy of it and no launcher traceback."""
    import io

    from diffrl.launch import _relay

    children = (b"step 1\rstep 2\rstep 3\n"                      # a progress bar redrawing its line
                b"W1202 starting\n"
                b"error: prompt file none.txt does not exist\n"
                b"error: prompt file none.txt does not exist\n"    # the other process's copy
                b"Traceback (most recent call last):\n  ...\nChildFailedError:\n"
                b"error: another problem\n")
    out = io.BytesIO()
    _relay(io.BufferedReader(io.BytesIO(children)), out)
    assert out.getvalue() == (b"step 1\rstep 2\rstep 3\nW1202 starting\n"
                              b"error: prompt file none.txt does not exist\nerror: another problem\n")


def test_sample_never_mixes_new_samples_with_earlier_ones(tmp_path):
    """An --out folder that holds an earlier `diffrl sample`'s output is refused before any model loads; the
    command's own default folder is cleared instead."""
    from diffrl import outputs
    from diffrl.errors import DiffrlError

    earlier = tmp_path / "mine"
    (earlier / "samples").mkdir(parents=True)
    (earlier / "grid.png").write_bytes(b"png")
    result = run_cli("sample", str(tmp_path / "no-run-needed"), "--prompt", "a cat", "--out", str(earlier))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"error: --out {earlier} already holds samples, grid.png of an "
                                                      f"earlier run of this command; choose a new --out folder, or "
                                                      f"remove them")
    assert outputs.fresh_folder(earlier, ("samples", "grid.png"), default=True) == earlier
    assert sorted(p.name for p in earlier.iterdir()) == []   # the default folder starts clean
    with pytest.raises(DiffrlError, match="cannot be written"):
        outputs.fresh_folder("/proc/diffrl-out", ("grid.png",), default=False)


def test_a_shipped_config_run_from_another_folder_says_where_it_looked_and_leaves_nothing(tmp_path):
    result = run_cli("train", str(REPO_ROOT / "configs" / "quickstart.yaml"), f"output_dir={tmp_path / 'run'}",
                     cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.path assets/sd3-text/prompts_held_out.txt: file not found")
    assert f"looked in {tmp_path}" in last and "give an absolute path" in last
    assert not (tmp_path / "run").exists()   # no stray config.yaml: nothing is written before the inputs are found


def test_a_launched_process_exits_with_its_code_and_skips_interpreter_teardown():
    """run_setup.exit_process: under a launcher (WORLD_SIZE > 1) the code comes back and atexit work does not
    run (the teardown where gloo's threads can abort a finished run); alone, it is a plain sys.exit."""
    script = ("import atexit, sys; atexit.register(lambda: print('teardown ran'));"
              "from diffrl.training.run_setup import exit_process; print('done', flush=True); exit_process(3)")
    for world, teardown in (("2", False), ("1", True)):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT,
                                env={**os.environ, "WORLD_SIZE": world}, timeout=120)
        assert result.returncode == 3 and result.stdout.startswith("done")
        assert ("teardown ran" in result.stdout) is teardown
