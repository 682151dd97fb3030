"""`diffrl score` end to end, as a user runs it."""

import json

import pytest
import torch
from PIL import Image

from diffrl.errors import DataError
from diffrl.media import load_image
from diffrl.scoring import collect_files, match_prompts
from tests.conftest import run_cli


@pytest.fixture
def folder(tmp_path):
    gen = torch.Generator().manual_seed(0)
    Image.new("RGB", (32, 32), (128, 128, 128)).save(tmp_path / "a_flat.png")
    noise = (torch.rand(32, 32, 3, generator=gen) * 255).byte().numpy()
    Image.fromarray(noise).save(tmp_path / "b_noise.png")
    Image.new("RGB", (48, 40), (10, 200, 30)).save(tmp_path / "c_other_size.jpg")
    (tmp_path / "d_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return tmp_path


def test_score_folder_survives_a_corrupt_file(folder, tmp_path):
    out = tmp_path / "scores.jsonl"
    failing = run_cli("score", "--reward", "jpeg_compressibility", "--images", str(folder), "--out", str(out),
                      "--quiet")
    assert failing.returncode == 1 and len(out.read_text().splitlines()) == 4   # every row written, then the exit
    assert failing.stderr.strip().splitlines()[-1].startswith("error: 1 of 4 inputs could not be read or scored")
    assert "--allow-failures" in failing.stderr
    result = run_cli("score", "--reward", "jpeg_compressibility", "--images", str(folder), "--out", str(out), "--quiet",
                     "--allow-failures")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file"].rsplit("/", 1)[1] for r in rows] == ["a_flat.png", "b_noise.png", "c_other_size.jpg",
                                                          "d_corrupt.png"]
    assert rows[0]["reward"] > rows[1]["reward"] and "reward" in rows[2]
    assert "error" in rows[3] and "cannot read the image" in rows[3]["error"] and "reward" not in rows[3]
    assert "warning:" in result.stderr and "d_corrupt.png" in result.stderr
    assert "jpeg_compressibility" not in result.stdout.splitlines()[0] and "reward" in result.stdout
    assert "1 input(s) could not be read or scored" in result.stdout


def test_score_csv_with_prompts_txt_and_weights(folder, tmp_path):
    (folder / "d_corrupt.png").unlink()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('flat "gray"\nnoise "x"\nother "y"\n')
    out = tmp_path / "scores.csv"
    result = run_cli("score", "--reward", "jpeg_compressibility=2,jpeg_incompressibility=1", "--images",
                     str(folder / "*.png"), str(folder / "*.jpg"), "--prompts", str(prompts), "--out", str(out),
                     "--quiet")
    assert result.returncode == 0, result.stderr
    header, *lines = out.read_text().splitlines()
    # the components' own per-sample numbers follow the scores (name/key)
    assert header == ("file,prompt,reward,jpeg_compressibility,jpeg_incompressibility,"
                      "jpeg_compressibility/kilobytes,jpeg_incompressibility/kilobytes") and len(lines) == 3
    assert all(float(line.rsplit(",", 1)[1]) > 0 for line in lines)
    assert 'flat ""gray""' in lines[0]


def test_nothing_scorable_exits_nonzero(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"")
    result = run_cli("score", "--reward", "jpeg_compressibility", "--images", str(tmp_path), "--quiet")
    assert result.returncode == 1
    assert "error: nothing could be scored" in result.stderr


def test_texts_jsonl(tmp_path):
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"text": "\\\\boxed{4}", "answer": "4"}\n{"text": "\\\\boxed{5}", "answer": "4"}\n')
    result = run_cli("score", "--reward", "math", "--texts", str(texts), "--out", str(tmp_path / "o.jsonl"))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == [1.0, 0.0]


@pytest.mark.parametrize("args, message", [
    (["--reward", "pickscor", "--images", "x"], "unknown reward 'pickscor'; did you mean 'pickscore'?"),
    (["--reward", "math", "--images", "{folder}"], "--reward math scores text, but image inputs were given"),
    (["--reward", "ocr", "--images", "{folder}/nope*.png"], "no such file, folder or glob match"),
    (["--reward", "ocr", "--images", "{folder}"], "these rewards need prompts"),
    (["--reward", "jpeg_compressibility=abc", "--images", "{folder}"], "weight 'abc' of 'jpeg_compressibility'"),
    (["--reward", "ocr", "--images", "{folder}", "--reward-kwargs", "{bad"], "--reward-kwargs is not valid JSON"),
])
def test_bad_score_inputs_are_one_line(folder, args, message):
    result = run_cli("score", *[a.replace("{folder}", str(folder)) for a in args], "--quiet")
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_prompt_matching(folder, tmp_path):
    files = collect_files([str(folder)], (".png",))
    assert [f.name for f in files] == ["a_flat.png", "b_noise.png", "d_corrupt.png"]
    meta = tmp_path / "meta.jsonl"
    meta.write_text('{"file_name": "b_noise.png", "prompt": "n"}\n{"file_name": "a_flat.png", "prompt": "f"}\n')
    with pytest.raises(DataError, match="has no prompt for d_corrupt.png"):
        match_prompts(files, str(meta), required=True)
    assert match_prompts(files[:2], str(meta), required=True) == ["f", "n"]
    short = tmp_path / "p.txt"
    short.write_text("one\n")
    with pytest.raises(DataError, match="has 1 prompts for 3 files"):
        match_prompts(files, str(short), required=True)


def test_truncated_png_is_a_data_error(folder, tmp_path):
    good = (folder / "b_noise.png").read_bytes()
    (tmp_path / "t.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="t.png: cannot read the image"):
        load_image(tmp_path / "t.png")
    assert load_image(folder / "c_other_size.jpg").shape == (3, 40, 48)


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` (1-bit grey): PIL checks the size when it opens it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def test_an_image_over_pils_size_limit_is_an_error_row_not_an_abort(folder, tmp_path, capsys):
    from diffrl import cli

    _png_header_only(folder / "e_huge.png", 20000, 10000)  # 200M pixels > 2 x Image.MAX_IMAGE_PIXELS
    with pytest.raises(DataError, match="e_huge.png: larger than PIL's limit .* downscale"):
        load_image(folder / "e_huge.png")
    out = tmp_path / "scores.jsonl"
    assert cli.main(["score", "--reward", "jpeg_compressibility", "--images", str(folder), "--out", str(out),
                     "--quiet", "--allow-failures"]) == 0
    rows = {r["file"].rsplit("/", 1)[1]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "decompression bombs" in rows["e_huge.png"]["error"] and "reward" in rows["b_noise.png"]
    assert "2 input(s) could not be read or scored" in capsys.readouterr().out


def test_score_videos_from_frame_folders_and_empty_file(tmp_path):
    clips = tmp_path / "clips"
    for name, shade in (("a", 128), ("b", None)):
        folder = clips / name
        folder.mkdir(parents=True)
        for t in range(3):
            pixels = torch.full((16, 16, 3), shade, dtype=torch.uint8) if shade is not None else \
                (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(t)) * 255).byte()
            Image.fromarray(pixels.numpy()).save(folder / f"{t:03d}.png")
    (clips / "c.mp4").write_bytes(b"")  # zero-byte video
    out = tmp_path / "v.jsonl"
    result = run_cli("score", "--reward", "video", "--videos", str(clips), "--out", str(out), "--quiet",
                     "--allow-failures",
                     "--reward-kwargs", '{"video": {"image_reward": "jpeg_compressibility", "num_frames": 2}}')
    assert result.returncode == 0, result.stderr
    rows = {json.loads(line)["file"].rsplit("/", 1)[1]: json.loads(line) for line in out.read_text().splitlines()}
    assert rows["a"]["reward"] > rows["b"]["reward"]  # flat frames compress better than noise
    assert "the video file is empty (0 bytes)" in rows["c.mp4"]["error"]


def test_an_out_that_cannot_be_written_is_one_line_before_any_scoring(folder, tmp_path):
    result = run_cli("score", "--reward", "jpeg_compressibility", "--images", str(folder), "--out", "/proc/x.jsonl",
                     "--quiet", "--allow-failures")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --out /proc/x.jsonl cannot be written")
    assert "scoring" not in result.stderr and "reward" not in result.stdout  # refused before the reward loaded
    result = run_cli("score", "--reward", "jpeg_compressibility", "--images", str(folder), "--out", str(tmp_path),
                     "--quiet")
    assert result.returncode == 1 and "is a folder; give a file name" in result.stderr


def test_a_write_that_fails_half_way_leaves_nothing_and_says_so(folder, tmp_path):
    """The file-size limit of the process (RLIMIT_FSIZE, set by the OS, as a full disk does) stops the score
    table part way: one line, exit 1, and neither the table nor its temporary file is left."""
    import resource
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (120, 120))

    out = tmp_path / "scores.jsonl"
    result = subprocess.run([sys.executable, "-m", "diffrl.cli", "score", "--reward", "jpeg_compressibility",
                             "--images", str(folder), "--out", str(out), "--quiet", "--allow-failures"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-800:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: writing {out} failed")
    assert list(tmp_path.glob("scores.jsonl*")) == []


def test_every_image_mode_loads_as_what_it_shows(tmp_path):
    """One loader for every mode PIL opens: a 16-bit grey ramp keeps its shades (not clipped to white), a
    palette and CMYK keep their colours, transparency is composited on white."""
    import numpy as np

    ramp = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)   # 0 .. 65535
    Image.fromarray(ramp.astype("<u2")).save(tmp_path / "grey16.png")   # mode I;16
    got = load_image(tmp_path / "grey16.png")
    expected = torch.tensor(np.rint(ramp / 65535 * 255) / 255, dtype=torch.float32)
    assert torch.allclose(got, expected.expand(3, 4, 4), atol=1 / 255) and got.min() == 0 and got.max() == 1
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "alpha.png")
    got = load_image(tmp_path / "alpha.png")
    assert got[:, 0, 0].tolist() == [0.0, 0.0, 1.0] and got[:, 1, 1].tolist() == [1.0, 1.0, 1.0]  # on white
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    assert load_image(tmp_path / "cmyk.jpg")[:, 2, 2].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=0.02)
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    assert load_image(tmp_path / "palette.png")[:, 0, 0].tolist() == pytest.approx([0.0, 200 / 255, 0.0])


def test_score_with_a_run_s_reward_settings_equals_its_training_s(folder, tmp_path):
    """--run RUN: the run's rewards, weights and options (here a JPEG quality and scale of its own), so the
    numbers are those its training saw; --reward-kwargs still overrides an option."""
    import yaml

    (folder / "d_corrupt.png").unlink()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"trainer": "awm", "reward": {
        "weights": {"jpeg_compressibility": 2.0, "jpeg_incompressibility": 1.0},
        "kwargs": {"jpeg_compressibility": {"quality": 50, "scale": 100.0}}}}))

    def scores(*args):
        out = tmp_path / f"s{len(list(tmp_path.glob('s*.jsonl')))}.jsonl"
        result = run_cli("score", "--images", str(folder), "--out", str(out), "--quiet", *args)
        assert result.returncode == 0, result.stderr
        return [json.loads(line)["reward"] for line in out.read_text().splitlines()]

    by_run = scores("--run", str(run))
    explicit = scores("--reward", "jpeg_compressibility=2,jpeg_incompressibility=1", "--reward-kwargs",
                      json.dumps({"jpeg_compressibility": {"quality": 50, "scale": 100.0}}))
    defaults = scores("--reward", "jpeg_compressibility=2,jpeg_incompressibility=1")
    assert by_run == explicit and by_run != defaults
    assert scores("--run", str(run), "--reward-kwargs", json.dumps({"jpeg_compressibility": {"quality": 95,
                                                                                             "scale": 500.0}})) \
        == defaults


def test_what_a_folder_holds_besides_images_is_reported_in_one_line(folder, tmp_path):
    (folder / "d_corrupt.png").unlink()
    (folder / "notes.txt").write_text("x")
    (folder / "clip.gif").write_bytes(b"GIF89a")
    (folder / "frames").mkdir()
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "prompt": "x"}) + "\n" for n in
                                                   ("a_flat.png", "b_noise.png", "c_other_size.jpg")))
    # ^ a generations folder's own side file: read, and not reported
    result = run_cli("score", "--reward", "jpeg_compressibility", "--images", str(folder), "--quiet")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(lines) == 1 and "skipped 2 file(s) of another type (.gif, .txt) and 1 sub-folder(s) (frames)" in lines[0]
