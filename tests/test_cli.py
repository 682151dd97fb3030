import json

from tests.conftest import REPO_ROOT, run_cli


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("train", "validate", "ls", "sample", "score", "eval"):
        assert command in result.stdout


def test_ls_lists_trainers_and_configs():
    result = run_cli("ls")
    assert result.returncode == 0, result.stderr
    assert "dllm_sft" in result.stdout and "arxiv.org/abs/2502.09992" in result.stdout
    assert "configs/quickstart.yaml" in result.stdout
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


def test_stub_commands_say_so():
    result = run_cli("sample")
    assert result.returncode == 1
    assert "not available in this version yet" in result.stderr
