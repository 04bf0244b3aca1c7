"""Tests of the reward foundation: media conversion, registry (built-ins, paths, entry points),
build_reward(s), WeightedSum, CallableReward and the DDPO JPEG rewards."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import flowalign.rewards as R
from flowalign.rewards import (
    BUILTIN_REWARDS,
    CallableReward,
    Reward,
    RewardOutput,
    WeightedSum,
    build_reward,
    build_rewards,
    list_rewards,
    resolve_reward_class,
)
from flowalign.rewards._media import check_media, from_pil_images, to_pil_images, to_uint8, video_to_frames
from flowalign.rewards.jpeg import JpegCompressibility, JpegIncompressibility

PLUGIN_MODULE = "fake_flowalign_reward_plugin"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def independent_jpeg_kb(media: torch.Tensor, quality: int = 95) -> list[float]:
    """DDPO's JPEG size, computed without flowalign: numpy rounding, PIL save, bytes / 1000."""
    arrays = np.round(media.numpy().astype(np.float64) * 255.0).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    sizes = []
    for a in arrays:
        buffer = io.BytesIO()
        Image.fromarray(a).save(buffer, format="JPEG", quality=quality)
        sizes.append(len(buffer.getvalue()) / 1000.0)
    return sizes


# ----------------------------------------------------------------------------- media


def test_media_round_trip_exact_at_uint8_precision():
    x = torch.rand(3, 3, 7, 5, generator=gen(0))
    images = to_pil_images(x)
    assert [im.mode for im in images] == ["RGB"] * 3 and all(im.size == (5, 7) for im in images)
    back = from_pil_images(images)
    assert back.shape == (3, 3, 7, 5) and back.dtype == torch.float32
    expected = torch.from_numpy(np.round(x.numpy().astype(np.float64) * 255.0) / 255.0).float()
    assert torch.equal(back, expected)
    assert (back - x).abs().max() <= 0.5 / 255 + 1e-7
    # media already on the uint8 grid survive the trip bit-exactly
    grid = torch.randint(0, 256, (2, 3, 4, 6), generator=gen(1)).float() / 255.0
    assert torch.equal(from_pil_images(to_pil_images(grid)), grid)


def test_to_uint8_matches_numpy_and_handles_video():
    v = torch.rand(2, 4, 3, 5, 6, generator=gen(2))
    out = to_uint8(v)
    assert out.dtype == np.uint8 and out.shape == (2, 4, 5, 6, 3)
    ref = np.round(v.numpy().astype(np.float64) * 255.0).astype(np.uint8).transpose(0, 1, 3, 4, 2)
    np.testing.assert_array_equal(out, ref)
    # a pixel's RGB values land in the last axis
    np.testing.assert_array_equal(out[1, 2, 3, 4], ref[1, 2, 3, 4])
    assert int(out[1, 2, 3, 4, 0]) == round(float(v[1, 2, 0, 3, 4]) * 255)


def test_from_pil_images_resize_and_modes():
    gray = Image.fromarray(np.full((10, 8), 200, dtype=np.uint8))  # mode "L", width 8, height 10
    rgba = Image.fromarray(np.zeros((10, 8, 4), dtype=np.uint8))
    out = from_pil_images([gray, rgba])
    assert out.shape == (2, 3, 10, 8)
    assert torch.allclose(out[0], torch.full((3, 10, 8), 200 / 255))
    resized = from_pil_images([gray], size=(4, 6))  # (height, width)
    assert resized.shape == (1, 3, 4, 6)
    assert torch.allclose(resized, torch.full((1, 3, 4, 6), 200 / 255))  # a constant image stays constant
    small = Image.fromarray(np.zeros((3, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"different sizes.*\(3, 3\).*\(10, 8\)"):
        from_pil_images([gray, small])
    with pytest.raises(ValueError, match="empty"):
        from_pil_images([])
    with pytest.raises(ValueError, match="size"):
        from_pil_images([gray], size=(4, 0))
    with pytest.raises(TypeError, match=r"images\[1\]"):
        from_pil_images([gray, np.zeros((3, 3))])


def test_check_media_accepts_tolerance_and_clamps():
    x = torch.rand(2, 3, 4, 4, generator=gen(3))
    x[0, 0, 0, 0] = 1.0 + 5e-4
    x[1, 0, 0, 0] = -5e-4
    out = check_media(x, "image")
    assert out.shape == x.shape and float(out.max()) == 1.0 and float(out.min()) == 0.0
    assert check_media(torch.rand(1, 2, 3, 4, 4, generator=gen(4)), "video").shape == (1, 2, 3, 4, 4)


@pytest.mark.parametrize(
    "media, modality, pattern",
    [
        (torch.rand(3, 4, 4), "image", r"shape \[B, 3, H, W\].*\(3, 4, 4\)"),
        (torch.rand(2, 1, 4, 4), "image", r"\(2, 1, 4, 4\)"),
        (torch.rand(2, 3, 4, 4), "video", r"\[B, F, 3, H, W\].*\(2, 3, 4, 4\)"),
        (torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8), "image", r"dtype torch\.uint8"),
        (torch.rand(2, 3, 4, 4) * 2 - 1.5, "image", r"\[0, 1\].*range \[-1\.\d+.*\(x \+ 1\) / 2"),
        (torch.full((2, 3, 4, 4), 1.002), "image", r"range \[1\.002, 1\.002\]"),
        (torch.full((1, 3, 2, 2), float("nan")), "image", r"12 NaN/Inf.*\(1, 3, 2, 2\)"),
        (torch.rand(2, 3, 4, 4), "audio", r"modality.*'audio'"),
    ],
)
def test_check_media_errors_name_the_problem(media, modality, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_media(media, modality)


def test_video_to_frames_order():
    v = torch.rand(2, 3, 3, 4, 5, generator=gen(5))
    frames, num_frames = video_to_frames(v)
    assert num_frames == 3 and frames.shape == (6, 3, 4, 5)
    for b in range(2):
        for f in range(3):
            assert torch.equal(frames[b * 3 + f], v[b, f])
    assert torch.equal(frames.view(2, 3, 3, 4, 5), v)
    with pytest.raises(ValueError, match="video media"):
        video_to_frames(torch.rand(2, 3, 4, 5))


# ----------------------------------------------------------------------------- registry


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A real installed-looking distribution: a module plus fakepkg-0.1.dist-info with entry points."""
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(textwrap.dedent('''
        import torch
        from flowalign.rewards import RewardOutput

        class FakeReward:
            name = "fake_plugin"
            modality = "image"

            def __init__(self, scale: float = 1.0):
                self.scale = scale

            def __call__(self, media, prompts, metadata=None):
                return RewardOutput(scores=self.scale * media.mean(dim=(1, 2, 3)))

        def brightness(media, prompts, metadata=None):
            return media.mean(dim=(1, 2, 3))

        def make_scaled(scale):
            def scaled(media, prompts, metadata=None):
                return scale * media.mean(dim=(1, 2, 3))
            return scaled

        NOT_CALLABLE = 3
    '''))
    (tmp_path / f"{PLUGIN_MODULE}_broken.py").write_text("import no_such_dependency_xyz\n\nclass Broken:\n    pass\n")
    dist = tmp_path / "fakepkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[flowalign.rewards]\nfake_plugin = {PLUGIN_MODULE}:FakeReward\n"
        f"[some.other.group]\nnot_a_reward = {PLUGIN_MODULE}:brightness\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in (PLUGIN_MODULE, f"{PLUGIN_MODULE}_broken"):
        sys.modules.pop(name, None)


def test_resolve_builtin_and_dotted_paths():
    assert resolve_reward_class("jpeg_compressibility") is JpegCompressibility
    assert resolve_reward_class("jpeg_incompressibility") is JpegIncompressibility
    assert resolve_reward_class("flowalign.rewards.jpeg:JpegIncompressibility") is JpegIncompressibility
    assert resolve_reward_class("flowalign.rewards.jpeg.JpegCompressibility") is JpegCompressibility
    assert resolve_reward_class("flowalign.rewards.weighted:WeightedSum") is WeightedSum


def test_every_importable_builtin_resolves_consistently():
    for name, info in BUILTIN_REWARDS.items():
        assert info.path.count(":") == 1 and info.modality in ("image", "video", "text")
        module = info.path.split(":")[0]
        if importlib.util.find_spec(module) is None:  # a zoo module not written yet
            continue
        cls = resolve_reward_class(name)
        assert callable(cls)
        if isinstance(getattr(cls, "modality", None), str):
            assert cls.modality == info.modality, name
        if name.startswith("jpeg"):
            assert cls.name == name


def test_resolve_real_entry_point(plugin):
    cls = resolve_reward_class("fake_plugin")
    assert cls.__name__ == "FakeReward" and cls.__module__ == PLUGIN_MODULE
    reward = build_reward("fake_plugin", scale=2.0)
    x = torch.rand(2, 3, 4, 4, generator=gen(6))
    assert torch.allclose(reward(x, ["a", "b"]).scores, 2.0 * x.mean(dim=(1, 2, 3)))
    rows = {row["name"]: row for row in list_rewards()}
    assert rows["fake_plugin"]["path"] == f"{PLUGIN_MODULE}:FakeReward"
    assert rows["fake_plugin"]["source"] == "entry point (fakepkg)"
    assert "not_a_reward" not in rows  # other groups are not rewards
    with pytest.raises(ValueError, match="not_a_reward"):
        resolve_reward_class("not_a_reward")


def test_unknown_name_lists_builtins(plugin):
    for bad in ("no_such_reward", "no_such_pkg.module:Thing", f"{PLUGIN_MODULE}:Missing"):
        with pytest.raises(ValueError) as info:
            resolve_reward_class(bad)
        message = str(info.value)
        assert repr(bad) in message
        for builtin in BUILTIN_REWARDS:
            assert builtin in message
    with pytest.raises(ValueError, match="NOT_CALLABLE.*not a class or callable"):
        resolve_reward_class(f"{PLUGIN_MODULE}:NOT_CALLABLE")
    with pytest.raises(ValueError, match="non-empty string"):
        resolve_reward_class("")
    # a module that exists but fails to import is an ImportError naming the reward and the cause
    with pytest.raises(ImportError, match=f"'{PLUGIN_MODULE}_broken:Broken'.*no_such_dependency_xyz"):
        resolve_reward_class(f"{PLUGIN_MODULE}_broken:Broken")


def test_list_rewards_rows():
    rows = list_rewards(include_entry_points=False)
    assert [r["name"] for r in rows] == list(BUILTIN_REWARDS)
    for row in rows:
        assert set(row) >= {"name", "path", "modality", "extra", "weights"}
    by_name = {r["name"]: r for r in rows}
    assert by_name["digit_classifier"]["path"] == "flowalign.rewards.digits:DigitClassifierReward"
    assert "assets/quickstart/digit-classifier" in by_name["digit_classifier"]["weights"]
    assert by_name["digit_judge"]["path"] == "flowalign.rewards.digits:DigitJudge"


# ----------------------------------------------------------------------------- build_reward(s)


def brightness(media, prompts, metadata=None):
    return media.mean(dim=(1, 2, 3))


def test_build_reward_spec_forms(plugin):
    jpeg = JpegCompressibility()
    assert build_reward(jpeg) is jpeg
    assert isinstance(build_reward(JpegIncompressibility), JpegIncompressibility)
    assert build_reward("jpeg_compressibility", quality=50).quality == 50
    built = build_reward({"_component_": "jpeg_incompressibility", "quality": 80, "weight": 3.0})
    assert isinstance(built, JpegIncompressibility) and built.quality == 80  # weight is not a kwarg
    renamed = build_reward({"_component_": "jpeg_compressibility", "name": "small_files"})
    assert renamed.name == "small_files" and JpegCompressibility.name == "jpeg_compressibility"
    wrapped = build_reward(brightness)
    assert isinstance(wrapped, CallableReward) and wrapped.name == "brightness" and isinstance(wrapped, Reward)
    x = torch.rand(2, 3, 4, 4, generator=gen(7))
    # a dotted path to a score function is wrapped; to a factory, called with the kwargs
    fn_reward = build_reward(f"{PLUGIN_MODULE}:brightness")
    assert fn_reward.name == "brightness" and torch.allclose(fn_reward(x, ["a", "b"]).scores, brightness(x, None))
    factory_reward = build_reward({"_component_": f"{PLUGIN_MODULE}.make_scaled", "scale": -3.0})
    assert torch.allclose(factory_reward(x, ["a", "b"]).scores, -3.0 * brightness(x, None))
    with pytest.raises(ValueError, match="_component_"):
        build_reward({"quality": 3})
    with pytest.raises(TypeError, match="jpeg_compressibility.*colour"):
        build_reward("jpeg_compressibility", colour="red")
    with pytest.raises(ValueError, match="already-built"):
        build_reward(jpeg, quality=3)
    with pytest.raises(ValueError, match="rename the already-built"):
        build_reward({"_component_": jpeg, "name": "other"})
    with pytest.raises(TypeError, match="int"):
        build_reward(3)


def test_build_reward_accepts_omegaconf():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"rewards": [{"_component_": "jpeg_compressibility", "quality": 70, "weight": 0.5}]})
    ws = build_rewards(cfg.rewards)
    assert ws.weights == {"jpeg_compressibility": 0.5} and ws.rewards["jpeg_compressibility"].quality == 70


def test_build_rewards_weighted_sum_matches_hand_computation():
    x = torch.rand(3, 3, 16, 16, generator=gen(8))
    prompts = ["a", "b", "c"]
    ws = build_rewards([
        {"_component_": "jpeg_compressibility", "weight": 0.5},
        {"_component_": brightness, "weight": -2.0, "name": "bright"},
        "jpeg_incompressibility",
    ])
    assert isinstance(ws, WeightedSum) and isinstance(ws, Reward)
    assert ws.name == "jpeg_compressibility+bright+jpeg_incompressibility" and ws.modality == "image"
    assert ws.weights == {"jpeg_compressibility": 0.5, "bright": -2.0, "jpeg_incompressibility": 1.0}
    out = ws(x, prompts)
    kb = independent_jpeg_kb(x)
    mean = x.double().mean(dim=(1, 2, 3)).tolist()
    hand = [0.5 * (-k) + (-2.0) * m + 1.0 * k for k, m in zip(kb, mean)]
    assert torch.allclose(out.scores, torch.tensor(hand, dtype=torch.float32), atol=1e-5)
    assert set(out.components) == {
        "jpeg_compressibility", "jpeg_compressibility/jpeg_kb", "bright",
        "jpeg_incompressibility", "jpeg_incompressibility/jpeg_kb",
    }
    assert torch.allclose(out.components["jpeg_compressibility"], -torch.tensor(kb))  # unweighted
    assert torch.allclose(out.components["bright"], torch.tensor(mean, dtype=torch.float32))
    assert out.valid is None

    # the dict form: name -> spec
    ws2 = build_rewards({"small": {"_component_": "jpeg_compressibility", "weight": 0.25}, "bright": brightness})
    assert ws2.name == "small+bright" and ws2.rewards["small"].name == "small" and ws2.rewards["bright"].name == "bright"
    hand2 = [0.25 * (-k) + m for k, m in zip(kb, mean)]
    assert torch.allclose(ws2(x, prompts).scores, torch.tensor(hand2, dtype=torch.float32), atol=1e-5)


def test_build_rewards_duplicates_and_bad_weights():
    with pytest.raises(ValueError, match="duplicate reward name 'jpeg_compressibility'"):
        build_rewards(["jpeg_compressibility", {"_component_": "jpeg_compressibility", "weight": 2}])
    with pytest.raises(ValueError, match="duplicate reward name 'brightness'"):
        build_rewards([brightness, brightness])
    ok = build_rewards([brightness, {"_component_": brightness, "name": "brightness2"}])
    assert list(ok.rewards) == ["brightness", "brightness2"]
    with pytest.raises(ValueError, match="weight of reward 'jpeg_compressibility'.*nan"):
        build_rewards([{"_component_": "jpeg_compressibility", "weight": float("nan")}])
    with pytest.raises(ValueError, match="no rewards"):
        build_rewards([])
    with pytest.raises(TypeError, match="list"):
        build_rewards("jpeg_compressibility")
    with pytest.raises(ValueError, match="conflicting 'name'"):
        build_rewards({"a": {"_component_": "jpeg_compressibility", "name": "b"}})


def test_prebuilt_reward_is_keyed_not_mutated():
    shared = JpegCompressibility()
    ws = build_rewards([{"_component_": shared, "name": "a"}, {"_component_": shared, "name": "b", "weight": 2.0}])
    assert list(ws.rewards) == ["a", "b"] and shared.name == "jpeg_compressibility"


# ----------------------------------------------------------------------------- WeightedSum guards


class FixedReward:
    """A Reward returning fixed scores (and optionally a valid mask)."""

    modality = "image"

    def __init__(self, name: str, scores: list[float], valid: list[bool] | None = None, modality: str = "image"):
        self.name, self.scores, self.valid, self.modality = name, scores, valid, modality

    def __call__(self, media, prompts, metadata=None):
        valid = None if self.valid is None else torch.tensor(self.valid)
        return RewardOutput(scores=torch.tensor(self.scores), components={"raw": torch.tensor(self.scores)}, valid=valid)


def test_weighted_sum_valid_and_components():
    x = torch.rand(3, 3, 4, 4, generator=gen(9))
    ws = WeightedSum(
        {"p": FixedReward("p", [1.0, 2.0, 3.0], [True, True, False]), "q": FixedReward("q", [10.0, 0.0, -1.0], [False, True, True]),
         "r": FixedReward("r", [0.5, 0.5, 0.5])},
        weights={"p": 2.0, "q": -1.0},
    )
    out = ws(x, ["a", "b", "c"])
    assert torch.equal(out.scores, torch.tensor([2 * 1.0 - 10.0 + 0.5, 2 * 2.0 - 0.0 + 0.5, 2 * 3.0 + 1.0 + 0.5]))
    assert torch.equal(out.valid, torch.tensor([False, True, False]))
    assert torch.equal(out.components["q/raw"], torch.tensor([10.0, 0.0, -1.0]))
    assert ws.weights == {"p": 2.0, "q": -1.0, "r": 1.0}


def test_nan_reward_raises_naming_it():
    x = torch.rand(2, 3, 4, 4, generator=gen(10))
    ws = WeightedSum({"fine": FixedReward("fine", [1.0, 2.0]), "broken": FixedReward("broken", [1.0, float("nan")])})
    with pytest.raises(FloatingPointError, match=r"'broken'.*NaN/Inf.*\[1\]"):
        ws(x, ["a", "b"])
    ws_inf = build_rewards([lambda m, p, md: torch.tensor([float("inf"), 0.0])])
    with pytest.raises(FloatingPointError, match="'<lambda>'"):
        ws_inf(x, ["a", "b"])


def test_wrong_batch_size_raises():
    x = torch.rand(2, 3, 4, 4, generator=gen(11))
    ws = WeightedSum({"short": FixedReward("short", [1.0, 2.0, 3.0])})
    with pytest.raises(ValueError, match="'short' returned 3 scores for a batch of 2"):
        ws(x, ["a", "b"])
    cr = CallableReward(lambda m, p, md: [1.0], name="one")
    with pytest.raises(ValueError, match="'one' returned 1 scores for a batch of 2"):
        cr(x, ["a", "b"])
    with pytest.raises(ValueError, match="3 prompts"):
        WeightedSum({"ok": FixedReward("ok", [1.0, 2.0])})(x, ["a", "b", "c"])


def test_weighted_sum_construction_errors():
    with pytest.raises(ValueError, match=r"modality.*img \(image\).*vid \(video\)"):
        WeightedSum({"img": FixedReward("img", [1.0]), "vid": FixedReward("vid", [1.0], modality="video")})
    with pytest.raises(ValueError, match="unknown reward.*'typo'"):
        WeightedSum({"a": FixedReward("a", [1.0])}, weights={"typo": 1.0})
    with pytest.raises(TypeError, match="'bad'.*Reward protocol"):
        WeightedSum({"bad": brightness})
    with pytest.raises(ValueError, match="empty"):
        WeightedSum({})


def test_callable_reward_validates():
    x = torch.rand(2, 3, 4, 4, generator=gen(12))
    cr = CallableReward(brightness)
    assert cr.name == "brightness" and cr.modality == "image"
    assert torch.allclose(cr(x, ["a", "b"]).scores, x.mean(dim=(1, 2, 3)))
    out = CallableReward(lambda m, p, md: RewardOutput(scores=torch.ones(2), valid=torch.tensor([True, False])))(x, ["a", "b"])
    assert torch.equal(out.valid, torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"range"):
        cr(x * 2 - 1, ["a", "b"])
    with pytest.raises(TypeError, match="'weird'.*got str"):
        CallableReward(lambda m, p, md: "high", name="weird")(x, ["a", "b"])
    with pytest.raises(ValueError, match="modality.*'audio'"):
        CallableReward(brightness, modality="audio")
    with pytest.raises(TypeError, match="callable"):
        CallableReward(3)


# ----------------------------------------------------------------------------- JPEG rewards


def smooth_and_noise(size: int = 64) -> torch.Tensor:
    """``[2, 3, size, size]``: a smooth colour gradient and uniform noise."""
    ramp = torch.linspace(0, 1, size)
    smooth = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                          (0.5 + 0.25 * (ramp[None, :] - ramp[:, None])).expand(size, size)])
    noise = torch.rand(3, size, size, generator=gen(13))
    return torch.stack([smooth, noise])


def test_jpeg_rewards_prefer_the_right_image_and_match_pil():
    x = smooth_and_noise()
    kb = independent_jpeg_kb(x)
    comp = JpegCompressibility()(x, ["p", "q"])
    incomp = JpegIncompressibility()(x, ["p", "q"])
    assert comp.scores.tolist() == pytest.approx([-k for k in kb], abs=1e-6)
    assert incomp.scores.tolist() == pytest.approx(kb, abs=1e-6)
    assert torch.equal(comp.components["jpeg_kb"], incomp.components["jpeg_kb"])
    assert comp.components["jpeg_kb"].tolist() == pytest.approx(kb, abs=1e-6)
    smooth, noise = 0, 1
    assert kb[smooth] < kb[noise] / 3  # a large, real gap, not a rounding accident
    assert comp.scores[smooth] > comp.scores[noise]
    assert incomp.scores[noise] > incomp.scores[smooth]
    # lower quality -> smaller files, still equal to PIL
    q50 = JpegIncompressibility(quality=50)(x, ["p", "q"]).scores
    assert q50.tolist() == pytest.approx(independent_jpeg_kb(x, 50), abs=1e-6) and bool((q50 < incomp.scores).all())
    with pytest.raises(ValueError, match="quality.*0"):
        JpegCompressibility(quality=0)
    with pytest.raises(ValueError, match="image media"):
        JpegCompressibility()(x[0], ["p"])


# ----------------------------------------------------------------------------- import weight


def test_import_does_not_load_torch():
    code = (
        "import sys\n"
        "import flowalign.rewards as R\n"
        "assert 'torch' not in sys.modules, 'import flowalign.rewards loaded torch'\n"
        "rows = R.list_rewards()\n"
        "assert R.BUILTIN_REWARDS['jpeg_compressibility'].modality == 'image'\n"
        "assert 'torch' not in sys.modules, 'listing rewards loaded torch'\n"
        "assert R.RewardOutput.__name__ == 'RewardOutput' and 'torch' in sys.modules\n"
        "print(len(rows))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= len(BUILTIN_REWARDS)


def test_lazy_exports():
    assert set(R.__all__) >= {"Reward", "RewardOutput", "WeightedSum", "CallableReward", "build_reward",
                              "build_rewards", "list_rewards", "resolve_reward_class", "BUILTIN_REWARDS"}
    assert R.WeightedSum is WeightedSum and "build_rewards" in dir(R)
    with pytest.raises(AttributeError, match="no_such_name"):
        R.no_such_name
