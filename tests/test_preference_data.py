"""Preference data: Pick-a-Pic and winner/loser layouts, lazy decoding, corrupt rows, videos."""

import io
import json

import pytest
import torch
from PIL import Image

from diffrl.data import PreferenceData
from diffrl.errors import DataError
from diffrl.media import decode_visual, load_video, resize_center_crop
from diffrl.models.tiny import save_preferences


def png_bytes(color, size=(24, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


RED, BLUE = (250, 0, 0), (0, 0, 250)


def pickapic_parquet(path):
    import datasets

    rows = {"caption": ["jpg_0 wins", "jpg_1 wins", "a tie", "corrupt winner"],
            "jpg_0": [png_bytes(RED), png_bytes(BLUE), png_bytes(RED), b"not an image"],
            "jpg_1": [png_bytes(BLUE), png_bytes(RED), png_bytes(BLUE), png_bytes(BLUE)],
            "label_0": [1.0, 0.0, 0.5, 1.0], "label_1": [0.0, 1.0, 0.5, 0.0]}
    datasets.Dataset.from_dict(rows).to_parquet(str(path))
    return path


def test_pickapic_layout_orients_winners_and_drops_ties(tmp_path):
    data = PreferenceData.load(pickapic_parquet(tmp_path / "pap.parquet"), need_loser=True)
    assert len(data) == 3 and [data.caption(i) for i in range(3)] == ["jpg_0 wins", "jpg_1 wins", "corrupt winner"]
    for item in range(2):
        _, winner, loser = data.get(item, size=16, with_loser=True)
        assert winner.shape == (3, 16, 16)
        assert winner[0].mean() > 0.9 and winner[2].mean() < 0.1      # red won
        assert loser[2].mean() > 0.9 and loser[0].mean() < 0.1        # blue lost
    with_ties = PreferenceData.load(tmp_path / "pap.parquet", keep_ties=True)
    assert len(with_ties) == 4 and with_ties.caption(2) == "a tie"


def test_corrupt_row_is_reported_once_and_replaced_by_the_next(tmp_path):
    data = PreferenceData.load(pickapic_parquet(tmp_path / "pap.parquet"))
    with pytest.warns(UserWarning, match=r"row 3 \(jpg_0\): cannot read the image.*row skipped"):
        captions, winners, losers = data.batch([2, 1], size=8)
    assert captions == ["jpg_0 wins", "jpg_1 wins"]        # row 3 (item 2) -> next readable item 0
    assert winners.shape == (2, 3, 8, 8) and losers is None
    assert data.bad == {2}


def test_every_row_corrupt_is_an_error(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"caption": "x", "winner": "missing.png"}) + "\n")
    data = PreferenceData.load(tmp_path)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no row could be decoded"):
        data.batch([0], size=8)


def test_folder_layout_and_missing_columns(tmp_path):
    folder = save_preferences(tmp_path / "prefs", num_rows=3)
    data = PreferenceData.load(folder, need_loser=True)
    caption, winner, loser = data.get(1, size=32, with_loser=True)
    assert caption == "a warm square number 1" and winner.shape == loser.shape == (3, 32, 32)
    assert winner[0].mean() > winner[2].mean() and loser[2].mean() > loser[0].mean()

    (tmp_path / "bad").mkdir()
    with pytest.raises(DataError, match="needs a metadata.jsonl"):
        PreferenceData.load(tmp_path / "bad")
    (tmp_path / "bad" / "metadata.jsonl").write_text(json.dumps({"text": "x", "winner": "a.png"}) + "\n")
    with pytest.raises(DataError, match="no 'caption' column .*data.caption_column"):
        PreferenceData.load(tmp_path / "bad")
    (tmp_path / "bad" / "metadata.jsonl").write_text(json.dumps({"caption": "x", "winner": "a.png"}) + "\n")
    with pytest.raises(DataError, match="pairwise training needs a losing sample"):
        PreferenceData.load(tmp_path / "bad", need_loser=True)
    (tmp_path / "bad" / "metadata.jsonl").write_text(json.dumps({"caption": "x", "picture": "a.png"}) + "\n")
    with pytest.raises(DataError, match="no winning-sample column"):
        PreferenceData.load(tmp_path / "bad")


def write_mp4(path, frames: torch.Tensor) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame.numpy(), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_rows_from_frame_folders_and_mp4(tmp_path):
    folder = save_preferences(tmp_path / "clips", num_rows=2, num_frames=5)
    frames = torch.zeros(9, 32, 48, 3, dtype=torch.uint8)
    frames[..., 0] = torch.arange(9).mul(30).view(9, 1, 1).to(torch.uint8)   # red ramps up frame by frame
    write_mp4(folder / "ramp.mp4", frames)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[1]["winner"] = "ramp.mp4"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    data = PreferenceData.load(folder, need_loser=True)
    _, winners, losers = data.batch([0, 1], size=16, num_frames=3, frame_stride=2, with_loser=True)
    assert winners.shape == losers.shape == (2, 3, 3, 16, 16)
    red = winners[1, :, 0].mean(dim=(1, 2))                # frames 0, 2, 4 of the ramp: 0, 60, 120 (/255)
    torch.testing.assert_close(red, torch.tensor([0.0, 60.0, 120.0]) / 255, atol=0.06, rtol=0)
    with pytest.warns(UserWarning, match="has 5 frames, needs 7"):
        data.batch([0, 1], size=16, num_frames=4, frame_stride=2)   # the 5-frame folder is skipped
    with pytest.raises(DataError, match="expected an image, found a video"):
        data.get(0, size=16)


def test_decode_visual_forms(tmp_path):
    red = decode_visual(png_bytes(RED))
    assert red.shape == (3, 20, 24) and red[0].min() > 0.95
    assert torch.equal(decode_visual({"bytes": png_bytes(RED), "path": None}), red)
    Image.new("RGB", (24, 20), RED).save(tmp_path / "r.png")
    assert torch.equal(decode_visual("r.png", root=tmp_path), red)
    with pytest.raises(DataError, match="does not exist"):
        decode_visual("nope.png", root=tmp_path, name="row 7")
    with pytest.raises(DataError, match="row 7: the image is empty"):
        decode_visual(b"", name="row 7")
    with pytest.raises(DataError, match="cannot read a int"):
        decode_visual(3)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_video(tmp_path / "empty.mp4")


def test_resize_center_crop_takes_the_middle():
    x = torch.zeros(3, 20, 40)
    x[:, :, 10:30] = 1.0                                    # the central 20 columns are white
    out = resize_center_crop(x, 10)
    assert out.shape == (3, 10, 10)
    assert out[..., 1:-1].min() > 0.99 and out.mean() > 0.95     # only the border columns are antialiased
    assert resize_center_crop(torch.zeros(2, 3, 20, 40), 10).shape == (2, 3, 10, 10)
