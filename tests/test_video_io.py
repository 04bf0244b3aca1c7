"""flowalign.training.video: GIF always, MP4 with the optional video extra, frame-by-frame grids."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign.training import video as video_io
from flowalign.training.video import pad_to_even, save_video, save_video_grid, tile_video_grid, to_uint8_frames

# pure colours survive GIF palette quantisation exactly
PALETTE = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0], [1, 1, 0]])


def colour_video(n_frames: int = 6, h: int = 10, w: int = 14, offset: int = 0) -> torch.Tensor:
    """Frame t: left half colour t, right half colour t+1 (mod palette) -> [F, 3, H, W]."""
    frames = torch.empty(n_frames, 3, h, w)
    for t in range(n_frames):
        frames[t, :, :, : w // 2] = PALETTE[(t + offset) % len(PALETTE)][:, None, None]
        frames[t, :, :, w // 2:] = PALETTE[(t + offset + 1) % len(PALETTE)][:, None, None]
    return frames


def read_gif(path: str) -> tuple[np.ndarray, list[int]]:
    frames, durations = [], []
    with Image.open(path) as im:
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
            durations.append(im.info["duration"])
    return np.stack(frames), durations


def test_to_uint8_frames_rounds_and_transposes():
    frames = torch.tensor([0.0, 0.5, 1.0, 0.2]).view(1, 1, 2, 2).expand(2, 3, 2, 2)
    out = to_uint8_frames(frames)
    assert out.shape == (2, 2, 2, 3) and out.dtype == np.uint8
    assert out[0, :, :, 0].tolist() == [[0, 128], [255, 51]]  # 127.5 rounds half-to-even -> 128


def test_gif_round_trip_exact_frames_and_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(video_io, "mp4_available", lambda: False)
    frames = colour_video()
    written = save_video(str(tmp_path / "sub" / "clip.mp4"), frames, fps=10)
    assert written == [str(tmp_path / "sub" / "clip.gif")]  # no mp4 without the extra
    back, durations = read_gif(written[0])
    assert back.shape == (6, 10, 14, 3)
    np.testing.assert_array_equal(back, to_uint8_frames(frames))
    assert durations == [100] * 6


def test_mp4_written_with_video_extra(tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    pytest.importorskip("imageio_ffmpeg")
    frames = colour_video(n_frames=8, h=15, w=21)  # odd sizes: padded to even for yuv420p
    written = save_video(str(tmp_path / "clip"), frames, fps=8)
    assert [os.path.basename(p) for p in written] == ["clip.gif", "clip.mp4"]
    back = np.stack(imageio.mimread(written[1]))
    assert back.shape == (8, 16, 22, 3)
    assert imageio.get_reader(written[1]).get_meta_data()["fps"] == 8
    err = np.abs(back[:, :15, :21].astype(float) - to_uint8_frames(frames).astype(float))
    assert err.mean() < 8  # lossy H.264, but each frame is its own colours (a frame mix-up gives ~100)


def test_tile_video_grid_places_each_cell():
    rows = [torch.stack([colour_video(3, 4, 6, offset=r * 2 + c) for c in range(2)]) for r in range(3)]
    grid = tile_video_grid(rows, pad=1, background=0.5)
    assert grid.shape == (3, 3, 3 * 5 + 1, 2 * 7 + 1)
    for r in range(3):
        for c in range(2):
            top, left = 1 + r * 5, 1 + c * 7
            assert torch.equal(grid[:, :, top:top + 4, left:left + 6], rows[r][c])
    assert (grid[:, :, 0] == 0.5).all() and (grid[:, :, :, 7] == 0.5).all()  # padding lines


def test_save_video_grid_gif(tmp_path, monkeypatch):
    monkeypatch.setattr(video_io, "mp4_available", lambda: False)
    rows = [torch.stack([colour_video(4, 4, 6, offset=c) for c in range(3)]) for _ in range(2)]
    (path,) = save_video_grid(str(tmp_path / "grid.gif"), rows, fps=5, pad=2, scale=2)
    back, durations = read_gif(path)
    assert back.shape == (4, 2 * (2 * 6 + 2), 2 * (3 * 8 + 2), 3) and durations == [200] * 4
    np.testing.assert_array_equal(back, to_uint8_frames(tile_video_grid(rows, pad=2).repeat_interleave(2, 2).repeat_interleave(2, 3)))


def test_pad_to_even():
    a = np.arange(2 * 3 * 5 * 3, dtype=np.uint8).reshape(2, 3, 5, 3)
    b = pad_to_even(a)
    assert b.shape == (2, 4, 6, 3)
    np.testing.assert_array_equal(b[:, 3], b[:, 2])
    np.testing.assert_array_equal(b[:, :, 5], b[:, :, 4])


def test_bad_input_is_named(tmp_path):
    good = colour_video(2, 4, 4)
    with pytest.raises(ValueError, match=r"\[F, 3, H, W\]"):
        save_video(str(tmp_path / "x.gif"), good[None])
    with pytest.raises(ValueError, match="range"):
        save_video(str(tmp_path / "x.gif"), good * 2)
    with pytest.raises(ValueError, match="NaN"):
        save_video(str(tmp_path / "x.gif"), good * float("nan"))
    with pytest.raises(ValueError, match="fps"):
        save_video(str(tmp_path / "x.gif"), good, fps=0)
    with pytest.raises(ValueError, match="'.avi'"):
        save_video(str(tmp_path / "x.avi"), good)
    with pytest.raises(ValueError, match=r"rows\[1\]"):
        tile_video_grid([good[None], good[None, :1]])
    with pytest.raises(ValueError, match="scale"):
        save_video_grid(str(tmp_path / "g.gif"), [good[None]], scale=0)
