"""diffrl command line: train | validate | ls | sample | score | eval | report.

Errors in user input print one line (``error: ...``) and exit 1; a traceback means a bug in diffrl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffrl.errors import DiffrlError, TrainingInterrupted

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shipped_configs() -> list[Path]:
    root = REPO_ROOT / "configs"
    return sorted(root.rglob("*.yaml")) if root.is_dir() else []


# ----------------------------------------------------------------------------------------------------------


def cmd_train(args) -> int:
    from diffrl import launch
    from diffrl.trainers import load_config

    launch.check_launch_args(args)
    config = load_config(args.config, args.overrides)  # validate before spawning anything
    if not launch.inside_launcher() and not args.print_launch:
        from diffrl.plan import preflight

        preflight.check_before_training(config, args.config, args.overrides, processes=args.num_processes,
                                        engine=launch.planned_engine(args.accelerate_config))
    if launch.needs_launcher(args) and not launch.inside_launcher():
        if hasattr(config, "group_size") and hasattr(config, "prompts_per_step"):
            from diffrl.training.rollout import check_group_split

            check_group_split(config.prompts_per_step, config.group_size, args.num_processes)
        if args.accelerate_config:
            launch.check_engine(args.accelerate_config)
        cmd = launch.launch_command(args)
        if args.print_launch:
            print(" ".join(cmd))
            return 0
        return launch.relaunch(cmd)
    if args.print_launch:
        print("(one process: no launcher)")
        return 0
    from diffrl.api import train

    result = train(config)
    if "report" in result:  # the main process
        shown = {k: v for k, v in result.items() if isinstance(v, float)}
        print("done: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        print(result["report"])
        extra = "report.png, summary.txt" + (", samples/" if (Path(config.output_dir) / "samples").is_dir() else "")
        print(f"report: {Path(config.output_dir) / 'index.html'} ({extra})")
    return 0


def cmd_report(args) -> int:
    from diffrl.report import format_summary, write_run_report

    for run_dir in args.run_dirs:
        summary = write_run_report(run_dir)
        print(f"{run_dir}:\n{format_summary(summary)}\nwrote {Path(run_dir) / 'index.html'}, report.png, "
              f"summary.txt")
    return 0


def cmd_validate(args) -> int:
    from diffrl.trainers import load_config

    # `diffrl validate CONFIG key=value` as `diffrl train` takes it: a key=value that is not a file is an override
    overrides = [a for a in args.configs if "=" in a and not Path(a).exists()]
    configs = [a for a in args.configs if a not in overrides]
    if not configs:
        raise DiffrlError("diffrl validate: no config given, only overrides; name a YAML config first")
    args.overrides = [*overrides, *args.overrides]
    for path in configs:
        config = load_config(path, args.overrides)
        print(f"ok: {path} ({config.trainer})")
    return 0


def cmd_ls(args) -> int:
    from diffrl.trainers import available_trainers

    trainers = available_trainers()
    unknown = [w for w in args.what if w not in _LISTERS and w not in trainers]
    if unknown:
        raise DiffrlError(f"diffrl ls: unknown section {unknown[0]!r}; choose from {', '.join(_LISTERS)}, or a "
                          f"trainer's name for its config fields ({', '.join(trainers)})")
    for section in args.what or list(_LISTERS):
        if section in trainers:
            _print_fields(section, trainers[section].config_class)
            continue
        rows = _LISTERS[section]()
        print(f"{section}:")
        if not rows:
            print("  (none)")
        width = max((len(r[0]) for r in rows), default=0)
        for name, *rest in rows:
            print(f"  {name.ljust(width)}  {'  '.join(str(x) for x in rest if x)}")
    return 0


def _print_fields(name: str, config_class: type) -> None:
    """Every config field of a trainer: key, type and valid range, default, help."""
    from diffrl.config import describe

    rows = describe(config_class)
    print(f"{name} config fields (key  type  default  help):")
    width = max(len(key) for key, *_ in rows)
    for key, kind, default, text in rows:
        print(f"  {key.ljust(width)}  {kind}  default {default}\n  {'':{width}}  {text}")


def _list_trainers():
    from diffrl.trainers import available_trainers

    return [(name, e.summary, e.paper) for name, e in available_trainers().items()]


def _list_models():
    from diffrl.models import describe_models

    return describe_models()


def _list_configs():
    rows = []
    for path in _shipped_configs():
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        note = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        rows.append((str(path.relative_to(REPO_ROOT)), note))
    return rows


def _list_estimators():
    from diffrl.advantages import describe_estimators

    return describe_estimators()


def _list_losses():
    from diffrl.losses import describe_losses

    return describe_losses()


def _list_curricula():
    from diffrl.config import all_keys
    from diffrl.curriculum import describe_curricula
    from diffrl.trainers import available_trainers

    trainers = available_trainers()
    return describe_curricula(lambda key: sorted(
        name for name, entry in trainers.items()
        if key in all_keys(entry.config_class) and key not in getattr(entry.config_class, "refused_keys", ())))


def _list_rewards():
    from rewards import describe_rewards

    return describe_rewards()


_LISTERS = {
    "trainers": _list_trainers,
    "models": _list_models,
    "estimators": _list_estimators,
    "losses": _list_losses,
    "curricula": _list_curricula,
    "rewards": _list_rewards,
    "configs": _list_configs,
}


def _reward_spec(text: str) -> dict[str, float]:
    """``pickscore,ocr`` or ``pickscore=1,ocr=0.5`` -> {name: weight}."""
    spec = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        try:
            spec[name] = float(weight) if weight else 1.0
        except ValueError:
            raise DiffrlError(f"--reward {text}: weight {weight!r} of {name!r} is not a number") from None
    if not spec:
        raise DiffrlError("--reward is empty; name at least one reward (see `diffrl ls rewards`)")
    return spec


def _check_device(name: str) -> None:
    """--device is a torch device this machine has: cpu, cuda, cuda:N, mps."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise DiffrlError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffrlError(f"--device {name}: this machine has no CUDA GPU visible to torch; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DiffrlError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible; use cuda:0 .. "
                          f"cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DiffrlError(f"--device {name}: MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DiffrlError(f"--device {name}: rewards run on cpu, cuda or mps")


def _reward_kwargs(text: str | None) -> dict:
    """--reward-kwargs: JSON options per reward ({} when not given)."""
    import json

    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise DiffrlError(f"--reward-kwargs is not valid JSON ({e.msg}); example: "
                          f"'{{\"pickscore\": {{\"divide_by\": 26}}}}'") from None


def _score_reward_settings(args) -> tuple[dict[str, float], dict]:
    """The rewards and their options for ``diffrl score``: ``--reward`` / ``--reward-kwargs``, on top of the
    run's own ``reward`` section with ``--run``."""
    import yaml

    given = _reward_kwargs(args.reward_kwargs)
    if not args.run:
        if not args.reward:
            raise DiffrlError("diffrl score needs --reward (e.g. --reward ocr), or --run RUN for a run's rewards")
        return _reward_spec(args.reward), given
    from diffrl.inference import resolve_run

    run_dir, _ = resolve_run(args.run)
    section = (yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}).get("reward") or {}
    if not section.get("weights"):
        raise DiffrlError(f"--run {args.run}: the run has no reward section (a preference run?); name the rewards "
                          f"with --reward")
    spec = _reward_spec(args.reward) if args.reward else {k: float(v) for k, v in section["weights"].items()}
    kwargs = {name: {**(section.get("kwargs") or {}).get(name, {}), **given.get(name, {})} for name in spec}
    return spec, {**given, **kwargs}


def cmd_score(args) -> int:
    import warnings

    from diffrl import media, outputs, scoring
    from rewards import load_reward

    spec, kwargs = _score_reward_settings(args)
    _check_device(args.device)
    if args.out:  # before any model loads: not a traceback after all the scoring
        outputs.writable_file(args.out)
    reward = load_reward(spec, device=args.device, kwargs=kwargs)
    modality = "text" if args.texts else "video" if args.videos else "image"
    if reward.modality != modality:
        raise DiffrlError(f"--reward {','.join(spec)} scores {reward.modality}, but {modality} inputs were given")
    if args.texts:
        rows = scoring.score_texts(args.texts, reward, batch_size=args.batch_size)
    else:
        video = args.videos is not None
        files = scoring.collect_files(args.videos if video else args.images,
                                      media.VIDEO_SUFFIXES if video else media.IMAGE_SUFFIXES,
                                      directories_are_items=video,
                                      report=lambda line: print(f"note: {line}", file=sys.stderr))
        prompts, metadata = scoring.match_records(files, args.prompts, required=reward.needs_prompts)
        loader = (lambda p: media.load_video(p, args.max_frames)) if video else media.load_image
        with warnings.catch_warnings():
            # unreadable files and unscored samples are error rows, reported once below as lines and a count
            warnings.simplefilter("ignore")
            rows = scoring.score_files(files, reward, prompts, loader=loader, batch_size=args.batch_size,
                                       progress=not args.quiet, metadata=metadata)
    failed = [r for r in rows if "error" in r]
    for row in failed:
        print(f"warning: {row['error']}", file=sys.stderr)
    if len(failed) == len(rows):  # before writing: no score table that looks like a result
        raise DiffrlError(f"nothing could be scored: every input failed to load or score (the first: "
                          f"{failed[0]['error']})")
    if args.out:
        scoring.write_rows(rows, args.out)
    print(scoring.format_summary(scoring.summarize(rows, reward.names), len(failed)))
    for component in reward.components:   # a benchmark's own summary (geneval: its per-tag table)
        if hasattr(component.reward, "table"):
            print(component.reward.table(rows, component.name))
    if args.out:
        print(f"wrote {len(rows)} rows to {args.out}")
    if failed and not args.allow_failures:
        raise DiffrlError(f"{len(failed)} of {len(rows)} inputs could not be read or scored (the first: "
                          f"{failed[0]['error']}); they are the rows with an 'error'"
                          f"{f' in {args.out}' if args.out else ''}; fix them, or pass --allow-failures")
    return 0


def cmd_eval(args) -> int:
    """Accuracy (and pass@k) of a diffusion-LLM config's model, or of a checkpoint of it, on the held-out tasks."""
    import json

    from diffrl.dllm.reasoning import check_correctness_reward, evaluate_reasoning, load_task_split
    from diffrl.inference import build_model, load_weights
    from diffrl.trainers import load_config
    from rewards import load_reward

    if Path(args.config).is_dir() and (Path(args.config) / "config.yaml").is_file():
        args.config = str(Path(args.config) / "config.yaml")
    config = load_config(args.config, args.overrides)
    if args.device:
        _check_device(args.device)
    if not args.checkpoint:  # say which weights the numbers are about
        print(f"note: no --checkpoint: this evaluates the base model {config.model.path}, not trained weights; add "
              f"--checkpoint {Path(args.config).parent}/checkpoints/step-N for a checkpoint", file=sys.stderr)
    if config.trainer not in ("igpo", "dllm_sft"):
        return _eval_images(args, config)
    _, tasks = load_task_split(config.data, config.seed)
    if not tasks:
        raise DiffrlError(f"{args.config}: data.eval_size is 0; set data.eval_size=N to hold out N tasks")
    reward_config = getattr(config, "reward", None)
    reward = load_reward(reward_config.weights if reward_config else {"math": 1.0},
                         kwargs=reward_config.kwargs if reward_config else None)
    correctness = getattr(config, "correctness", "math")
    check_correctness_reward(reward, correctness)
    model = build_model(config, args.device)
    if args.checkpoint:
        load_weights(model, config, Path(args.checkpoint))
    model.module.eval()
    metrics = evaluate_reasoning(model, tasks, reward, config.generation, correctness=correctness,
                                 chat_template=config.chat_template, k=args.k, batch_size=args.batch_size or 32,
                                 seed=config.seed)
    print(json.dumps({"config": args.config, "checkpoint": args.checkpoint, "tasks": len(tasks), **metrics}))
    return 0


def _eval_images(args, config) -> int:
    import json

    from diffrl import outputs
    from diffrl.image_eval import evaluate_images

    kwargs = _reward_kwargs(args.reward_kwargs) or None
    out = outputs.fresh_folder(args.out or Path(args.config).parent / "eval-cli",
                               ("eval.json", "base.png", "checkpoint.png"), default=not args.out)
    table = evaluate_images(config, checkpoint=args.checkpoint, prompts_file=args.prompts,
                            reward_spec=_reward_spec(args.reward) if args.reward else None, reward_kwargs=kwargs,
                            seed=args.seed, batch_size=args.batch_size or 4, out=out, weights=args.weights,
                            device=args.device)
    print(json.dumps(table))
    print(f"wrote {out / 'eval.json'}, {out / 'base.png'}" + (f", {out / 'checkpoint.png'}" if args.checkpoint
                                                                 else ""), file=sys.stderr)
    return 0


def cmd_serve_reward(args) -> int:
    from diffrl.reward_server import serve
    from rewards import load_reward

    kwargs = _reward_kwargs(args.reward_kwargs)
    _check_device(args.device)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token:
        print(f"warning: serving on {args.host} without --token: anyone who reaches this port can use it",
              file=sys.stderr)
    if args.max_batch < 1 or args.batch_wait_ms < 0:
        raise DiffrlError("--max-batch must be at least 1 and --batch-wait-ms at least 0")
    serve(load_reward(_reward_spec(args.reward), device=args.device, kwargs=kwargs), args.host, args.port,
          token=args.token, max_batch=args.max_batch, batch_wait=args.batch_wait_ms / 1000)
    return 0


def cmd_push(args) -> int:
    from diffrl import model_card

    if args.folder:
        folder = model_card.prepare(args.run, args.folder, repo_id=args.repo_id, weights=args.weights)
        print(f"wrote {folder} (README.md model card, weights, config.yaml); upload it with `diffrl push "
              f"{args.run} {args.repo_id}`")
        return 0
    url = model_card.push(args.run, args.repo_id, weights=args.weights, private=args.private)
    print(f"pushed {args.run} to {args.repo_id}: {url}")
    return 0


def cmd_sample(args) -> int:
    from diffrl import inference, outputs

    if args.device:
        _check_device(args.device)
    if args.num < 1:
        raise DiffrlError(f"--num {args.num}: must be at least 1")
    prompts, images = inference.read_prompts(args.prompt, args.prompts, args.image)
    # where the samples go, checked before the model loads; earlier samples are never mixed with new ones
    out = outputs.fresh_folder(args.out or inference.resolve_run(args.run)[0] / "samples-cli",
                               ("samples", "samples.jsonl", "grid.png"), default=not args.out)
    run = inference.load(args.run, weights=args.weights, device=args.device, overrides=args.overrides)
    rows = inference.sample(run, prompts, num=args.num, seed=args.seed, batch_size=args.batch_size,
                            temperature=args.temperature, images=images)
    written = inference.write_samples(rows, out)
    source = run.checkpoint or f"{run.run_dir} (base model: no checkpoint yet)"
    extra = "" if run.is_text else f" and {out / 'grid.png'}"
    print(f"wrote {len(rows)} samples of {source} ({run.weights} weights): {written}{extra}")
    return 0


# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffrl", description="RL alignment of diffusion models: AWM, Flow-GRPO, "
                                     "SePPO, IGPO. Run `diffrl COMMAND --help` for a command's options.")
    from diffrl import __version__

    parser.add_argument("--version", action="version", version=f"diffrl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train from a YAML config", description="Train from a YAML config. "
                           "Overrides look like optim.lr=1e-4 max_steps=10.")
    train.add_argument("config", help="path to a YAML config (see `diffrl ls configs`)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    train.add_argument("--num-processes", type=int, default=1, help="processes to launch, over all machines "
                       "(accelerate's meaning; re-launches under `accelerate launch`)")
    train.add_argument("--accelerate-config", help="a shipped accelerate config (ddp, fsdp, zero2) or a path")
    train.add_argument("--num-machines", type=int, default=1, help="machines (nodes) of a multi-node run")
    train.add_argument("--machine-rank", type=int, default=0, help="this machine's rank, 0 .. num-machines - 1")
    train.add_argument("--main-process-ip", help="address of the rank-0 machine (multi-node)")
    train.add_argument("--main-process-port", type=int, default=29500, help="its port (multi-node)")
    train.add_argument("--print-launch", action="store_true", help="print the launch command and stop")
    train.set_defaults(func=cmd_train)

    validate = sub.add_parser("validate", help="check configs without running them")
    validate.add_argument("configs", nargs="+", help="YAML configs")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override applied to every config (repeatable)")
    validate.set_defaults(func=cmd_validate)

    from diffrl.plan import command as plan_command

    plan_command.add_parser(sub)

    ls = sub.add_parser("ls", help="list trainers, estimators, losses, curricula, rewards and shipped configs; "
                        "`diffrl ls awm`: a trainer's config fields")
    ls.add_argument("what", nargs="*", help=f"sections to list: {', '.join(_LISTERS)} (default: all), or a "
                    f"trainer's name for every field of its config with type, range, default and help")
    ls.set_defaults(func=cmd_ls)

    score = sub.add_parser("score", help="score images, videos or texts with reward models",
                           description="Score a folder of generations. Examples: diffrl score --reward pickscore "
                           "--images out/ --prompts prompts.txt --out scores.jsonl")
    score.add_argument("--reward", help="rewards, comma-separated, optionally weighted: pickscore,ocr or "
                       "pickscore=1,ocr=0.5 (default with --run: the run's)")
    score.add_argument("--run", help="a training run (its output_dir or a checkpoint): score with its reward "
                       "settings (each reward's options; its weights when --reward is not given), so the scores "
                       "equal its training's")
    inputs = score.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", nargs="+", help="image folders, files or globs")
    inputs.add_argument("--videos", nargs="+", help="video files (needs av) or folders of frames, or globs")
    inputs.add_argument("--texts", help="jsonl with 'text' (and 'prompt', 'answer', ... metadata) per row")
    score.add_argument("--prompts", help="prompts.txt (sorted file order) or metadata.jsonl (file_name, prompt)")
    score.add_argument("--out", help="write one row per sample: .jsonl or .csv")
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    score.add_argument("--max-frames", type=int, default=None, help="frames read per video (default: all)")
    score.add_argument("--reward-kwargs", help="JSON: options per reward, e.g. '{\"pickscore\": {\"divide_by\": 26}}'")
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.add_argument("--allow-failures", action="store_true", help="exit 0 even when inputs could not be read or "
                       "scored (they stay rows with an 'error' and are counted)")
    score.set_defaults(func=cmd_score)

    evaluate = sub.add_parser("eval", help="evaluate a model or checkpoint: accuracy and pass@k of diffusion-LLM "
                              "runs; rewards of image / video runs, base and checkpoint side by side",
                              description="Diffusion LLMs (igpo, dllm_sft): accuracy, pass@k and both per level on "
                              "the config's held-out tasks. Image / video runs: the base model and --checkpoint on "
                              "the same prompts and noise, scored by the run's reward (or --reward), a JSON table "
                              "and a grid each. Examples: diffrl eval configs/igpo/tiny_arithmetic.yaml --checkpoint "
                              "outputs/igpo_tiny/checkpoints/step-000040 --k 4 ; diffrl eval outputs/quickstart/latest "
                              "--checkpoint outputs/quickstart/latest/checkpoints/step-000080 --reward pickscore")
    evaluate.add_argument("config", help="the run's YAML config, or a run folder (its config.yaml)")
    evaluate.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    evaluate.add_argument("--checkpoint", help="a checkpoint folder of the run (default: the base model)")
    evaluate.add_argument("--k", type=int, default=1, help="also report pass@k from k samples per task")
    evaluate.add_argument("--batch-size", type=int, default=None,
                          help="sequences (32) or images (4) per generation forward")
    evaluate.add_argument("--prompts", help="images: prompt file, or a shipped set by name (ocr_simple, shapes); "
                          "default: the run's evaluation prompts")
    evaluate.add_argument("--reward", help="images: rewards, as in diffrl score (default: the run's reward)")
    evaluate.add_argument("--reward-kwargs", help="images: JSON options per reward")
    evaluate.add_argument("--seed", type=int, default=None, help="images: noise seed (default: the run's eval_seed)")
    evaluate.add_argument("--weights", choices=["raw", "ema"], default="raw", help="images: the checkpoint's "
                          "trained weights or their EMA")
    evaluate.add_argument("--out", help="images: folder for eval.json and the grids (default: RUN/eval-cli)")
    evaluate.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: a GPU when present)")
    evaluate.set_defaults(func=cmd_eval)

    report = sub.add_parser("report", help="rebuild report.png, summary.txt and index.html of runs",
                            description="Plots and an HTML page from a run's metrics.jsonl and samples/ grids "
                            "(written at the end of every `diffrl train`; rebuild any time, also mid-run).")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a run")
    report.set_defaults(func=cmd_report)

    serve = sub.add_parser("serve-reward", help="serve reward plug-ins over HTTP (for the `remote` reward)",
                           description="Serve rewards over HTTP: GET /health, POST /score. Binds to 127.0.0.1; "
                           "no authentication unless --token is set. Example: diffrl serve-reward --reward "
                           "pickscore,ocr=0.5 --port 8000 --device cuda")
    serve.add_argument("--reward", required=True, help="rewards, as in diffrl score")
    serve.add_argument("--reward-kwargs", help="JSON options per reward")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (another than 127.0.0.1 exposes the "
                       "server to the network: set --token)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token", default=None, help="require Authorization: Bearer TOKEN on every request")
    serve.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    serve.add_argument("--max-batch", type=int, default=64, help="most samples scored in one call when "
                                                                 "concurrent requests are merged")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a request waits for others "
                                                                        "to merge with (milliseconds)")
    serve.set_defaults(func=cmd_serve_reward)

    push = sub.add_parser("push", help="share a run: its weights, config, results and a model card, on the hub",
                          description="Upload a run's newest checkpoint (or a checkpoints/step-N folder) to the "
                          "Hugging Face hub with a model card; --folder DIR writes the folder only, offline.")
    push.add_argument("run", help="a run's output_dir or one of its checkpoints/step-N folders")
    push.add_argument("repo_id", help="hub repository, e.g. me/sd35-ocr-lora")
    push.add_argument("--weights", choices=["raw", "ema"], default="raw", help="trained weights or their EMA")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--folder", help="write what would be pushed into this folder and stop (no network)")
    push.set_defaults(func=cmd_push)

    sample = sub.add_parser("sample", help="generate with a trained run or checkpoint",
                            description="Generate with the run's model and trained weights, using its own sampling "
                            "settings (overridable). Example: diffrl sample outputs/quickstart/latest --prompt 'a red "
                            "circle' --num 4 --out gen/ ; then diffrl score --images gen/samples --reward ... (its "
                            "metadata.jsonl holds the prompts)")
    sample.add_argument("run", help="a run's output_dir (its newest checkpoint) or a checkpoints/step-N folder")
    sample.add_argument("overrides", nargs="*", help="key.sub=value overrides of the run's config "
                        "(e.g. sampling.eval_num_steps=20)")
    sample.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    sample.add_argument("--prompts", help="prompt file: .txt one per line, .jsonl / .parquet with 'prompt', or a "
                        "folder whose metadata.jsonl rows hold 'prompt' and 'image' (image editing)")
    sample.add_argument("--image", action="append", help="the input image of each --prompt (image-editing models "
                        "such as FLUX.1 Kontext; repeatable, in the same order)")
    sample.add_argument("--num", type=int, default=1, help="samples per prompt")
    sample.add_argument("--seed", type=int, default=0, help="seed of the noise (the same seed, the same samples)")
    sample.add_argument("--weights", choices=["raw", "ema"], default="raw", help="trained weights or their EMA")
    sample.add_argument("--temperature", type=float, default=None,
                        help="diffusion LLMs: sampling temperature (default: the run's evaluation temperature)")
    sample.add_argument("--batch-size", type=int, default=8, help="samples per forward")
    sample.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: a GPU when present)")
    sample.add_argument("--out", default=None, help="output folder (default: RUN/samples-cli)")
    sample.set_defaults(func=cmd_sample)
    return parser


def _extra_overrides(extra: list[str]) -> list[str]:
    """Overrides found after options: ``key=value`` anywhere, and ``--key value`` / ``--key=value`` (the
    TRL / Hugging Face style; dashes in the key read as underscores)."""
    overrides, i = [], 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--"):
            if "=" not in item:
                raise DiffrlError(f"unexpected argument {item!r}; overrides look like key.sub=value")
            overrides.append(item)
        elif "=" in item:
            key, value = item[2:].split("=", 1)
            overrides.append(f"{key.replace('-', '_')}={value}")
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            overrides.append(f"{item[2:].replace('-', '_')}={extra[i + 1]}")
            i += 1
        else:
            raise DiffrlError(f"{item} has no value; write {item} VALUE or {item[2:]}=VALUE")
        i += 1
    return overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or args.command == "validate":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *_extra_overrides(extra)]
    for name in ("batch_size", "k"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise DiffrlError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        return args.func(args)
    except TrainingInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code  # 128 + the signal's number (SIGTERM 143, SIGINT 130), as a process killed by it
    except DiffrlError as e:
        # one write: the processes of a launched run print the same line into one pipe, whole lines only
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    from diffrl.training.run_setup import exit_process

    exit_process(main())
