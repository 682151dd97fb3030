"""Progress display of a training run: a tqdm bar on a terminal, and plain lines (one every ``every_seconds``)
when stderr goes to a file (SLURM, nohup, CI), where a bar's carriage-return updates pile up by the thousand."""

from __future__ import annotations

import sys
import time


class LineProgress:
    """The part of tqdm's interface the trainers use, printing ``desc: step 12/60 (5.1 s/step) k=v ...``
    at most once every ``every_seconds`` and at the last step."""

    def __init__(self, *, total: int, initial: int, desc: str, every_seconds: float = 30.0, stream=None):
        self.total, self.n, self.desc = total, initial, desc
        self.every_seconds, self.stream = every_seconds, stream or sys.stderr
        self.start_n, self.start = initial, time.monotonic()
        self.last_print = self.start
        self.postfix: dict[str, str] = {}

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **postfix: str) -> None:
        self.postfix = postfix
        now = time.monotonic()
        if now - self.last_print >= self.every_seconds or self.n >= self.total:
            self.last_print = now
            done = self.n - self.start_n
            rate = f" ({(now - self.start) / done:.2f} s/step)" if done else ""
            fields = "".join(f" {k}={v}" for k, v in postfix.items())
            print(f"{self.desc}: step {self.n}/{self.total}{rate}{fields}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


def progress_bar(accelerator, *, total: int, initial: int, enabled: bool, desc: str, every_seconds: float = 30.0):
    """A tqdm bar on a terminal or in Jupyter; plain lines every ``every_seconds`` otherwise; nothing when
    disabled or off the main process."""
    from tqdm.auto import tqdm

    show = enabled and accelerator.is_main_process
    notebook = "ipykernel" in sys.modules  # tqdm.auto draws a widget there
    if show and not sys.stderr.isatty() and not notebook:
        return LineProgress(total=total, initial=initial, desc=desc, every_seconds=every_seconds)
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not show)


def startup_line(trainer, name: str, resumed_from=None) -> str:
    """What a run is about to do, printed once at its start: trainable weights, processes and device, samples
    per optimizer step, where it writes, and whether it continues a checkpoint."""
    cfg, acc = trainer.config, trainer.accelerator
    params = {id(p): p for group in trainer.optimizer.param_groups for p in group["params"]}
    trainable = sum(p.numel() for p in params.values())
    batch = cfg.samples_per_step(acc.num_processes)
    where = f"resumed from step {trainer.step} ({resumed_from})" if resumed_from is not None else "fresh start"
    parts = [f"{trainable:,} trainable parameters", f"{acc.num_processes} process(es) on {acc.device.type}",
             batch, f"output {cfg.output_dir}", where]
    return f"{name}: " + ", ".join(p for p in parts if p)
