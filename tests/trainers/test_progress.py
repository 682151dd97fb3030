"""Plain progress lines when stderr is a file (nohup, SLURM, CI), instead of a bar's carriage returns."""

import io

from diffrl.training.progress import LineProgress


def run(every_seconds: float) -> list[str]:
    stream = io.StringIO()
    bar = LineProgress(total=4, initial=1, desc="igpo", every_seconds=every_seconds, stream=stream)
    for step in range(2, 5):
        bar.update(1)
        bar.set_postfix(reward=f"{step / 10:.1f}")
    bar.close()
    return stream.getvalue().splitlines()


def test_a_line_per_interval_and_always_the_last_step():
    lines = run(every_seconds=0.0)
    assert [line.split(" (")[0] for line in lines] == ["igpo: step 2/4", "igpo: step 3/4", "igpo: step 4/4"]
    assert lines[-1].endswith("s/step) reward=0.4") and "\r" not in "".join(lines)


def test_a_long_interval_prints_only_the_last_step():
    lines = run(every_seconds=1e9)
    assert len(lines) == 1 and lines[0].startswith("igpo: step 4/4 (") and lines[0].endswith("reward=0.4")
