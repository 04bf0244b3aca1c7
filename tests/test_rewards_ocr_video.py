"""OCR reward (edit distance, Flow-GRPO's scoring rule; the real PP-OCRv4 ONNX weights shipped in
the rapidocr-onnxruntime wheel on rendered text, cross-checked against RapidOCR's own pipeline where
it imports; real tesseract where the binary is installed) and the video rewards (frame sampling /
aggregation of image rewards, CLIP temporal consistency loaded from a tiny random CLIP saved in the
original checkpoint layout)."""

from __future__ import annotations

import functools
import importlib.util
import os
import random
import shutil
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from flowalign.rewards import RewardOutput, build_reward
from flowalign.rewards._media import from_pil_images, to_pil_images
from flowalign.rewards.jpeg import jpeg_size_kb
from flowalign.rewards.ocr import (
    OcrReward,
    levenshtein,
    min_area_rect,
    normalize_text,
    ocr_text_reward,
    quoted_target,
    rapidocr_model_dir,
    reading_order,
    rect_corners,
)
from flowalign.rewards.video import (
    FrameAggregatedReward,
    TemporalConsistencyReward,
    adjacent_cosine,
    frame_indices,
)

HAS_TESSERACT = shutil.which("tesseract") is not None and importlib.util.find_spec("pytesseract") is not None
needs_tesseract = pytest.mark.skipif(not HAS_TESSERACT, reason="tesseract binary / pytesseract not installed "
                                     "(apt-get install -y tesseract-ocr; pip install pytesseract)")
try:
    rapidocr_model_dir()
    RAPIDOCR_MISSING = ""
except ImportError as _err:
    RAPIDOCR_MISSING = str(_err)
needs_rapidocr = pytest.mark.skipif(bool(RAPIDOCR_MISSING), reason=f"PP-OCRv4 models not installed: {RAPIDOCR_MISSING}")
DEJAVU = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")  # ships with matplotlib
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])  # openai/CLIP clip/clip.py _transform
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


# ------------------------------------------------------------------------------ edit distance / OCR scoring


@functools.lru_cache(maxsize=None)
def recursive_levenshtein(a: str, b: str) -> int:
    """The textbook recursive definition (independent of the row-wise dynamic programme)."""
    if not a or not b:
        return len(a) + len(b)
    return min(recursive_levenshtein(a[1:], b) + 1, recursive_levenshtein(a, b[1:]) + 1,
               recursive_levenshtein(a[1:], b[1:]) + (a[0] != b[0]))


def flow_grpo_reward(recognized: str, target: str) -> float:
    """Flow-GRPO flow_grpo/ocr.py OcrScorer scoring, transcribed step by step."""
    recognized = recognized.replace(" ", "").lower()
    prompt = target.replace(" ", "").lower()
    dist = 0 if prompt in recognized else recursive_levenshtein(recognized, prompt)
    if dist > len(prompt):
        dist = len(prompt)
    return 1 - dist / len(prompt)


def test_levenshtein_hand_worked_and_against_the_recursive_definition():
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert levenshtein("flaw", "lawn") == 2  # -f, +n
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3 and levenshtein("abc", "abc") == 0
    assert levenshtein("helloworld", "hellpwodd") == 3
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        assert levenshtein(a, b) == recursive_levenshtein(a, b) == levenshtein(b, a), (a, b)
    with pytest.raises(TypeError, match="str"):
        levenshtein("a", None)


def test_ocr_scoring_rule_is_flow_grpos():
    cases = [("hello world\n", "hello world", 1.0), ("hellp wodd", "hello world", 0.7),
             ("xx HELLO WORLD yy", "Hello World", 1.0),  # contained -> distance 0
             ("z" * 40, "hello", 0.0),  # distance capped at len(target): never negative
             ("", "hello", 0.0), ("helo", "hello", 0.8)]
    for recognized, target, expected in cases:
        assert ocr_text_reward(recognized, target) == pytest.approx(expected)
        assert ocr_text_reward(recognized, target) == pytest.approx(flow_grpo_reward(recognized, target))
    assert quoted_target('a sign that says "hello world" on a wall') == "hello world"
    assert quoted_target('"a" and "b"') == "a"
    assert normalize_text(" Hel lo\n\tWorld ") == "helloworld"
    for bad in ("no quotes here", 'only "one quote', 'empty "  " quotes'):
        with pytest.raises(ValueError, match="double quotes"):
            quoted_target(bad)


def test_missing_backends_are_clear_errors(monkeypatch):
    if importlib.util.find_spec("pytesseract") is None:
        with pytest.raises(ImportError, match="pip install pytesseract"):
            OcrReward(backend="tesseract")
    else:
        with pytest.raises(RuntimeError, match="apt-get install -y tesseract-ocr"):
            OcrReward(backend="tesseract", tesseract_cmd="/nonexistent/tesseract")
    with pytest.raises(ValueError, match="psm"):
        OcrReward(psm=42)
    with pytest.raises(ValueError, match="backend"):
        OcrReward(backend="paddle")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "rapidocr_onnxruntime" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install flowalign\\[ocr\\]"):
        OcrReward()  # the default backend fails at construction (the contract test then skips), not at scoring


def test_min_area_rect_and_reading_order():
    rng = np.random.default_rng(0)
    for angle in (0.0, 0.3, -1.1, np.pi / 2):
        u, v = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
        a, b = rng.uniform(-40, 40, 500), rng.uniform(-10, 10, 500)  # a filled 80 x 20 rectangle, rotated
        points = np.round(np.array([100.0, 90.0]) + a[:, None] * u + b[:, None] * v).astype(int)
        corners = np.array([[100, 90] + sa * 40 * u + sb * 10 * v for sa in (-1, 1) for sb in (-1, 1)])
        points = np.concatenate([points, np.round(corners).astype(int)])
        center, axes, size = min_area_rect(points)
        assert sorted(size.tolist()) == pytest.approx([20, 80], abs=1.5)
        assert np.abs(center - [100, 90]).max() < 1.0
        assert np.abs(axes @ axes.T - np.eye(2)).max() < 1e-9  # orthonormal
        box = rect_corners(center, axes, size)
        inside = np.abs((points - center) @ axes.T) <= size / 2 + 1e-6
        assert inside.all()  # encloses every point
        assert box[0][0] <= box[1][0] and box[0][1] <= box[3][1]  # top-left, top-right, bottom-right, bottom-left
    rect = lambda x, y, w=40, h=12: np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=float)
    # two lines; the second word of line 1 sits 3 px lower, line 2's words come in right-to-left order
    boxes = [rect(150, 53), rect(60, 50), rect(200, 100), rect(10, 102), rect(100, 101)]
    assert reading_order(boxes) == [1, 0, 3, 4, 2]
    assert reading_order([]) == []


def render(text: str, size=(192, 192), font_size: int = 28, xy=(16, 80), angle: float = 0.0) -> Image.Image:
    """Black text in DejaVu Sans on white; ``angle`` rotates the whole image (degrees, counter-clockwise)."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).multiline_text(xy, text, fill="black", font=ImageFont.truetype(DEJAVU, font_size))
    return image.rotate(angle, fillcolor="white", resample=Image.Resampling.BICUBIC) if angle else image


@pytest.fixture(scope="module")
def rapidocr_reward():
    if RAPIDOCR_MISSING:
        pytest.skip(f"PP-OCRv4 models not installed: {RAPIDOCR_MISSING}")
    return OcrReward.tiny("unused")


@needs_rapidocr
def test_rapidocr_reads_rendered_text_with_the_shipped_pp_ocrv4_weights(rapidocr_reward):
    fresh = OcrReward()
    assert fresh.backend == "rapidocr" and fresh._engine is None  # the models load lazily, on the first score
    reward = rapidocr_reward
    blank = Image.new("RGB", (192, 192), "white")
    media = from_pil_images([render("hello world"), render("hellp wodd"), render("hello"), blank])
    noise = torch.rand(1, 3, 192, 192, generator=torch.Generator().manual_seed(0))
    media = torch.cat([media, noise])
    prompts = ['a sign that says "hello world"'] * 5
    out = reward(media, prompts)
    engine = reward._engine
    assert engine is not None and reward.engine is engine  # one engine per reward object
    assert out.scores.dtype == torch.float32 and out.scores.shape == (5,)
    exact, misspelled, partial, empty, noisy = out.scores.tolist()
    assert exact == 1.0 and out.components["exact"].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert misspelled == pytest.approx(0.7)  # PP-OCRv4 reads the misspelling exactly: 3 edits of 10
    assert partial == pytest.approx(0.5)  # "hello" is 5 deletions away from "helloworld"
    assert empty == 0.0 and noisy == 0.0  # nothing found -> "" -> distance len(target)
    assert reward.recognize(media[3:4]) == [""]
    # the same picture scored against a target it does not show
    other = reward(media[:1], ['a sign that says "goodbye moon"'])
    assert other.scores.tolist() == [0.0]  # "helloworld" vs "goodbyemoon": distance capped at 11
    # batch invariant, deterministic, and metadata["text"] overrides the prompt's quotes
    assert torch.equal(reward(media[1:3].flip(0), prompts[:2]).scores, out.scores[1:3].flip(0))
    assert out.valid.tolist() == [True] * 5
    relabelled = reward(media[1:2], ["no quotes"], [{"text": "hellp wodd"}])
    assert relabelled.scores.tolist() == [1.0]
    # a prompt with nothing to read is an unscorable sample, not a crash
    with pytest.warns(UserWarning, match="no quotes"):
        mixed = reward(media[:2], ['says "hello world"', "no quotes"])
    assert mixed.scores.tolist() == [1.0, 0.0] and mixed.valid.tolist() == [True, False]


@needs_rapidocr
def test_rapidocr_reads_lines_in_order_rotated_text_and_small_renders(rapidocr_reward):
    reward = rapidocr_reward
    images = [render("two lines\nof text here", size=(512, 512), font_size=40, xy=(60, 180)),
              render("goodbye moon", size=(512, 512), font_size=40, xy=(60, 200), angle=12),
              render("hello world", size=(128, 48), font_size=16, xy=(6, 14))]
    texts = [normalize_text(t) for t in reward.recognize(from_pil_images(images[:2]))]
    assert texts == ["twolinesoftexthere", "goodbyemoon"]
    small = reward(from_pil_images([images[2]]), ['"hello world"'])
    assert small.scores.tolist() == [1.0]  # a 128 x 48 render: the detector sees it upscaled to 736 px
    upside_down = reward(from_pil_images([render("hello world").rotate(180)]), ['"hello world"'])
    assert upside_down.scores.item() < 0.5  # no angle classifier (Flow-GRPO scores with cls=False)


@needs_rapidocr
def test_rapidocr_backend_never_imports_opencv():
    """opencv-python needs the system's libGL.so.1; the reward must work where it is missing."""
    code = ("import sys, torch\n"
            "from flowalign.rewards.ocr import OcrReward\n"
            "out = OcrReward()(torch.ones(1, 3, 64, 64), ['\"a\"'])\n"
            "assert out.scores.tolist() == [0.0], out\n"
            "assert 'cv2' not in sys.modules and 'rapidocr_onnxruntime' not in sys.modules, 'opencv was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@needs_rapidocr
def test_rapidocr_backend_agrees_with_rapidocrs_own_pipeline(rapidocr_reward):
    """Same models, independent pre/post-processing: RapidOCR's own (OpenCV) pipeline reads the same text."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as err:  # e.g. opencv-python without the system's libGL.so.1
        pytest.skip(f"RapidOCR's own pipeline cannot be imported here: {err}")
    engine = RapidOCR()
    images = [render("hello world"), render("goodbye moon", size=(128, 96), font_size=16, xy=(8, 40)),
              render("two lines\nof text here", size=(512, 512), font_size=40, xy=(60, 180)),
              render("Flow GRPO 42", size=(512, 384), font_size=44, xy=(40, 150), angle=-8)]
    for image in images:
        result, _ = engine(np.asarray(image)[:, :, ::-1].copy(), use_cls=False)  # RapidOCR reads arrays as BGR
        expected = normalize_text("".join(line[1] for line in result or []))
        assert normalize_text(rapidocr_reward.recognize(from_pil_images([image]))[0]) == expected


@needs_tesseract
def test_tesseract_on_rendered_text_ranks_exact_over_misspelled_over_noise():
    reward = OcrReward(backend="tesseract")
    media = from_pil_images([render("hello world"), render("hellp wodd"), render("hello")])
    noise = torch.rand(1, 3, 192, 192, generator=torch.Generator().manual_seed(0))
    media = torch.cat([media, noise])
    prompts = ['a sign that says "hello world"'] * 4
    out = reward(media, prompts)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (4,)
    exact, misspelled, partial, noisy = out.scores.tolist()
    assert exact == 1.0 and out.components["exact"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert exact > misspelled > noisy and exact > partial > noisy
    assert misspelled == pytest.approx(0.7)  # tesseract reads the misspelling exactly: 3 edits of 10
    one_by_one = torch.cat([reward(media[i:i + 1], prompts[i:i + 1]).scores for i in range(4)])
    assert torch.equal(one_by_one, out.scores)
    relabelled = reward(media[1:2], ["no quotes"], [{"text": "hellp wodd"}])
    assert relabelled.scores.tolist() == [1.0]


# ------------------------------------------------------------------------------ frame aggregation


def test_frame_indices_and_adjacent_cosine():
    assert frame_indices(8, 3).tolist() == [0, 4, 7]  # round(linspace(0, 7, 3)) = round(0, 3.5, 7)
    assert frame_indices(9, 3).tolist() == [0, 4, 8]
    assert frame_indices(5, None).tolist() == frame_indices(5, 9).tolist() == [0, 1, 2, 3, 4]
    assert frame_indices(7, 1).tolist() == [3]
    e = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.cosine_similarity(e[:, :-1], e[:, 1:], dim=-1)
    torch.testing.assert_close(adjacent_cosine(e), expected)
    with pytest.raises(ValueError, match="F >= 2"):
        adjacent_cosine(e[:, :1])


class PromptLength:
    """Image reward depending on the prompt and metadata, with a validity mask."""

    name, modality = "prompt_length", "image"

    def __call__(self, media, prompts, metadata=None):
        extra = torch.tensor([float(m["bonus"]) for m in metadata]) if metadata else torch.zeros(len(media))
        mean = media.mean(dim=(1, 2, 3))
        return RewardOutput(scores=mean + torch.tensor([float(len(p)) for p in prompts]) + extra,
                            components={"mean": mean}, valid=mean > 0.45)


def test_frame_aggregated_reward_equals_per_frame_scores_reduced():
    video = torch.rand(3, 8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    prompts = ["a", "bb", "ccc"]
    for reduce in ("mean", "min"):
        reward = build_reward({"_component_": "flowalign.rewards.video:FrameAggregatedReward",
                               "reward": {"_component_": "jpeg_compressibility", "quality": 90},
                               "reduce": reduce, "num_frames": 3})
        out = reward(video, prompts)
        expected = []
        for b in range(3):
            kb = jpeg_size_kb(to_pil_images(video[b, [0, 4, 7]]), quality=90)
            expected.append(-kb.mean() if reduce == "mean" else (-kb).min())
        torch.testing.assert_close(out.scores, torch.stack(expected), rtol=0, atol=1e-6)
        assert out.scores.dtype == torch.float32 and set(out.components) == {"jpeg_kb", "frame_min", "frame_max"}
    # prompts and metadata follow their video's frames; validity is all-frames
    reward = FrameAggregatedReward(PromptLength(), num_frames=None)
    meta = [{"bonus": 10}, {"bonus": 20}, {"bonus": 30}]
    out = reward(video, prompts, meta)
    frame_means = video.mean(dim=(2, 3, 4))  # [B, F]
    torch.testing.assert_close(out.scores, frame_means.mean(1) + torch.tensor([11.0, 22.0, 33.0]))
    torch.testing.assert_close(out.components["mean"], frame_means.mean(1))
    assert torch.equal(out.valid, (frame_means > 0.45).all(dim=1))
    # batch invariance and the test builder
    tiny = FrameAggregatedReward.tiny("unused")
    full = tiny(video, prompts).scores
    assert torch.equal(torch.cat([tiny(video[i:i + 1], prompts[i:i + 1]).scores for i in range(3)]), full)


def test_frame_aggregated_reward_errors():
    with pytest.raises(ValueError, match="reduce"):
        FrameAggregatedReward("jpeg_compressibility", reduce="max")
    with pytest.raises(ValueError, match="num_frames"):
        FrameAggregatedReward("jpeg_compressibility", num_frames=0)
    with pytest.raises(ValueError, match="needs an image reward"):
        FrameAggregatedReward(FrameAggregatedReward.tiny("unused"))
    reward = FrameAggregatedReward("jpeg_compressibility")
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        reward(torch.rand(2, 3, 8, 8), ["a", "b"])
    with pytest.raises(ValueError, match="prompts"):
        reward(torch.rand(2, 2, 3, 8, 8), ["a"])


# ------------------------------------------------------------------------------ temporal consistency


def tiny_clip(tmp_path):
    """A tiny random full CLIP model (the openai/clip-vit-* layout) + 16-px processor saved to disk."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(1)
    config = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4),
        projection_dim=24,  # != the vision config's default 512: the loader must take the top-level size
    )
    model = CLIPModel(config).eval()
    path = str(tmp_path / "clip")
    model.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(path)
    return model, path


def reference_pixels(frame: torch.Tensor, size: int = 16) -> torch.Tensor:
    """openai/CLIP _transform by hand: resize shortest side (bicubic), centre crop, normalize."""
    image = Image.fromarray((frame.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((int(w * scale) if w > h else size, int(h * scale) if h > w else size), Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float64) / 255.0
    return torch.from_numpy(((array - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)).float()


def test_temporal_consistency_loads_the_clip_checkpoint_and_matches_an_independent_computation(tmp_path):
    model, path = tiny_clip(tmp_path)
    reward = TemporalConsistencyReward(path, batch_size=5)
    assert reward.model.config.projection_dim == 24
    video = torch.rand(2, 4, 3, 24, 32, generator=torch.Generator().manual_seed(2))
    frames = video.flatten(0, 1)
    pixels = reward.pixel_values(frames)
    assert pixels.shape == (8, 3, 16, 16)
    torch.testing.assert_close(pixels, torch.stack([reference_pixels(f) for f in frames]), atol=2e-5, rtol=0)
    with torch.no_grad():  # the in-memory full CLIP model: projection of the pooled vision output
        expected_embeds = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(reward.embed(frames), expected_embeds, atol=1e-5, rtol=1e-5)
    out = reward(video, ["a", "b"])
    e = expected_embeds.view(2, 4, -1)
    cos = torch.nn.functional.cosine_similarity(e[:, :-1], e[:, 1:], dim=-1)
    torch.testing.assert_close(out.scores, cos.mean(dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.components["min_adjacent"], cos.min(dim=1).values, atol=1e-5, rtol=1e-5)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (2,)
    # batch invariance
    one_by_one = torch.cat([reward(video[i:i + 1], ["a"]).scores for i in range(2)])
    torch.testing.assert_close(one_by_one, out.scores, atol=1e-6, rtol=0)


def test_temporal_consistency_ranks_a_static_video_above_a_flickering_one(tmp_path):
    reward = TemporalConsistencyReward.tiny(str(tmp_path))
    frame = torch.rand(1, 1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    static = frame.expand(1, 5, 3, 16, 16).clone()
    flicker = torch.rand(1, 5, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    out = reward(torch.cat([static, flicker]), ["a", "b"])
    assert out.scores[0].item() == pytest.approx(1.0, abs=1e-5) and out.scores[1] < out.scores[0]
    with pytest.raises(ValueError, match="at least 2 frames"):
        reward(static[:, :1], ["a"])
    with pytest.raises(OSError, match="path="):
        TemporalConsistencyReward(str(tmp_path / "nowhere"))
