"""``diffrl plan CONFIG [key=value ...]``: the command line of :mod:`diffrl.plan.planner`."""

from __future__ import annotations

import json
from pathlib import Path

from diffrl.errors import DiffrlError

HELP = ("trace one training step of a config at full size under fake tensors (no GPU, nothing downloaded): "
        "memory per phase, FLOPs, step time, and whether it fits a GPU")


def add_parser(sub) -> None:
    plan = sub.add_parser("plan", help=HELP, description=HELP[0].upper() + HELP[1:] + ". The GPU and process "
                          "count default to the config's '# Hardware: 8x H100 80GB' header line, the engine to its "
                          "launch line.")
    plan.add_argument("config", help="path to a YAML config (see `diffrl ls configs`)")
    plan.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    plan.add_argument("--gpu", help="h100, h200, a100-80, a100-40, l40s, rtx4090, or NAME:GB")
    plan.add_argument("--num-processes", type=int, help="processes (GPUs) the run uses")
    plan.add_argument("--accelerate-config", help="the engine: ddp (traced) or fsdp (FSDP2, counted from the trace: "
                      "each process holds shards of the trained model); default: the config's launch line, else ddp")
    plan.add_argument("--no-suggest", action="store_true", help="when it does not fit, do not plan the changes "
                      "that could make it fit (each is traced again)")
    plan.add_argument("--out", help="write the plan as JSON here")
    plan.set_defaults(func=run)


def run(args) -> int:
    from diffrl.launch import planned_engine
    from diffrl.plan.hardware import config_engine, config_hardware, parse_gpu
    from diffrl.plan.planner import describe, plan, suggest

    if not Path(args.config).is_file():
        raise DiffrlError(f"diffrl plan: {args.config} is not a file; name a YAML config (`diffrl ls configs`)")
    header = config_hardware(args.config)
    gpu = parse_gpu(args.gpu) if args.gpu else header[1] if header else None
    processes = args.num_processes or (header[0] if header else 1)
    if processes < 1:
        raise DiffrlError(f"--num-processes {processes}: must be at least 1")
    engine = planned_engine(args.accelerate_config or config_engine(args.config))
    result = plan(args.config, args.overrides, processes=processes, gpu=gpu, engine=engine)
    if result.fits is False and not args.no_suggest:
        result.suggestions = suggest(result, args.overrides)
    print(describe(result))
    if gpu is None:
        print("no GPU named (--gpu, or a '# Hardware: 8x H100 80GB' line in the config): no verdict")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result.to_json(), indent=1))
    return 0 if result.fits is not False else 2
