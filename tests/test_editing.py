"""Image-editing plumbing: source-image records and their loader, the adapter-side ``encode(..., images=)``
contract, the config checks of an editing model's prompt files, and the SSIM preservation reward."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from flowalign.config import ConfigError, load_config
from flowalign.data.images import load_source_images, resolve_record_images
from flowalign.pipelines.base import AdapterBase
from flowalign.recipes.rl import _metadata
from flowalign.rewards.registry import build_reward
from flowalign.rewards.source_similarity import SourceSSIM, gaussian_window, ssim
from tests.conftest import REPO

KONTEXT_CONFIG = os.path.join(REPO, "configs/grpo/flux_kontext_ssim.yaml")


def _png(path, array: np.ndarray, mode: str | None = None) -> str:
    Image.fromarray(array, mode).save(path)
    return str(path)


# -- loader ---------------------------------------------------------------------------------------
def test_load_source_images_converts_resolves_and_caches(tmp_path):
    os.makedirs(tmp_path / "img")
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    _png(tmp_path / "img" / "g.png", gray)  # 8-bit grayscale -> RGB
    rgba = np.zeros((2, 5, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128
    _png(tmp_path / "img" / "c.png", rgba, "RGBA")
    source = str(tmp_path / "prompts.jsonl")
    records = [{"prompt": "a", "image": "img/g.png"}, {"prompt": "b", "image": ["img/c.png", "img/g.png"]}]
    images = load_source_images(records, source=source)
    assert [len(i) for i in images] == [1, 2]
    g = images[0][0]
    assert g.shape == (3, 3, 4) and g.dtype == torch.float32
    torch.testing.assert_close(g[1], torch.from_numpy(gray).float() / 255)  # every channel is the gray level
    assert images[1][0].shape == (3, 2, 5) and images[1][0][:, 0, 0].tolist() == [1.0, 0.0, 0.0]  # alpha dropped
    assert images[1][1] is g  # cached per path
    resolved = resolve_record_images(records, source=source)
    assert resolved[0]["image"] == str(tmp_path / "img" / "g.png")  # a string stays a string, now absolute
    assert resolved[1]["image"] == [str(tmp_path / "img" / "c.png"), str(tmp_path / "img" / "g.png")]
    assert records[0]["image"] == "img/g.png"  # the input is not modified
    meta = _metadata(resolved, [0, 1])  # what rewards receive (JSON-safe)
    assert meta[0] == {"image": str(tmp_path / "img" / "g.png"), "group": 0} and json.dumps(meta)


def test_load_source_images_errors_name_file_record_and_path(tmp_path):
    source = str(tmp_path / "p.jsonl")
    with pytest.raises(ConfigError, match=r"p\.jsonl: record 1 .*has no \"image\""):
        load_source_images([{"prompt": "a", "image": "x.png"}, {"prompt": "b"}], source=source)
    with pytest.raises(ConfigError, match=r"record 0.*source image not found: .*missing\.png"):
        load_source_images([{"prompt": "a", "image": "missing.png"}], source=source)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match=r"record 0: cannot read the source image .*bad\.png"):
        load_source_images([{"prompt": "a", "image": "bad.png"}], source=source)
    with pytest.raises(ConfigError, match="must be a path or a non-empty list of paths"):
        load_source_images([{"prompt": "a", "image": []}], source=source)


# -- adapter-side contract ----------------------------------------------------------------------------
class _Editing(AdapterBase):
    """The smallest editing adapter: text embeds = prompt lengths, image condition = mean pixel."""

    source_images = 1

    def _embed(self, prompts):
        return {"text": torch.tensor([[float(len(p))] for p in prompts])}

    def _image_condition(self, images):
        return {"image_latents": torch.stack([per[0].mean().reshape(1) for per in images])}


def test_encode_carries_the_image_condition_in_both_cfg_halves():
    images = [[torch.full((3, 2, 2), 0.25)], [torch.full((3, 4, 4), 0.75)]]
    cond = _Editing().encode(["ab", "abcd"], ["", ""], images=images)
    assert cond.tensors["text"].flatten().tolist() == [2.0, 4.0] and cond.negative["text"].flatten().tolist() == [0.0, 0.0]
    assert cond.tensors["image_latents"].flatten().tolist() == [0.25, 0.75]
    torch.testing.assert_close(cond.negative["image_latents"], cond.tensors["image_latents"])
    assert cond[torch.tensor([1, 1, 0])].tensors["image_latents"].flatten().tolist() == [0.75, 0.75, 0.25]  # rollout rows
    with pytest.raises(ValueError, match="_Editing edits source images: encode"):
        _Editing().encode(["a"])
    with pytest.raises(ValueError, match=r"must be \[3, H, W\] tensors"):
        _Editing().encode(["a"], images=[[torch.zeros(2, 2)]])
    text_only = type("TextOnly", (_Editing,), {"source_images": 0})()
    with pytest.raises(ValueError, match="TextOnly is a text-to-media adapter: it takes no source images"):
        text_only.encode(["a"], images=images[:1])
    multi = type("Multi", (_Editing,), {"source_images": -1})()
    assert len(multi.encode(["a"], images=[[images[0][0], images[1][0]]])) == 1  # several images are fine


# -- config checks --------------------------------------------------------------------------------------
def test_editing_model_refuses_txt_and_records_without_image(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("make it red\n")
    with pytest.raises(ConfigError, match=r"data.train_prompts: flux_kontext edits source images, so its prompt file must be JSONL"):
        load_config(KONTEXT_CONFIG, {"data.train_prompts": str(txt), "output_dir": str(tmp_path / "run")})
    jsonl = tmp_path / "p.jsonl"
    _png(tmp_path / "a.png", np.zeros((4, 4, 3), dtype=np.uint8))
    jsonl.write_text('# comment\n{"prompt": "x", "image": "a.png"}\n\n{"prompt": "y"}\n')
    with pytest.raises(ConfigError, match=r"data.train_prompts: .*p\.jsonl:4 .*has no \"image\""):
        load_config(KONTEXT_CONFIG, {"data.train_prompts": str(jsonl), "output_dir": str(tmp_path / "run")})
    jsonl.write_text('{"prompt": "x", "image": ["a.png", "a.png"]}\n')
    with pytest.raises(ConfigError, match=r"p\.jsonl:1: flux_kontext edits exactly one source image per prompt, got 2"):
        load_config(KONTEXT_CONFIG, {"data.train_prompts": str(jsonl), "output_dir": str(tmp_path / "run")})
    jsonl.write_text('{"prompt": "x", "image": "gone.png"}\n')
    with pytest.raises(ConfigError, match=r"eval.prompts: .*p\.jsonl:1: source image not found: .*gone\.png"):
        load_config(KONTEXT_CONFIG, {"eval.prompts": str(jsonl), "output_dir": str(tmp_path / "run")})
    jsonl.write_text('{"prompt": "x", "image": "a.png"}\n')
    cfg = load_config(KONTEXT_CONFIG, {"data.train_prompts": str(jsonl), "output_dir": str(tmp_path / "run")})
    assert cfg.data.train_prompts == str(jsonl)


# -- SSIM preservation reward -----------------------------------------------------------------------
def test_ssim_hand_worked_examples():
    w = gaussian_window(11)
    assert w.shape == (11, 11) and w.sum().item() == pytest.approx(1.0) and w[5, 5] == w.max()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    # constant images a, b: variances and covariance vanish, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = 0.01^2
    a, b = torch.full((1, 3, 16, 16), 0.5), torch.full((1, 3, 16, 16), 0.25)
    expected = (2 * 0.5 * 0.25 + 1e-4) / (0.25 + 0.0625 + 1e-4)  # = 0.80006...
    assert ssim(a, b).item() == pytest.approx(expected, abs=1e-6)
    # one 3x3 window (window shrinks to the image): structure term of an anti-correlated pair is negative
    p = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]).expand(1, 3, 3, 3)
    assert ssim(p, 1 - p).item() < 0


def test_source_ssim_reward_reads_the_source_from_metadata(tmp_path):
    rng = np.random.default_rng(0)
    src = (rng.random((8, 8, 3)) * 255).round().astype(np.uint8)
    path = _png(tmp_path / "s.png", src)
    reward = build_reward({"_component_": "source_ssim"})
    assert isinstance(reward, SourceSSIM) and reward.modality == "image"
    exact = torch.from_numpy(src).permute(2, 0, 1).float().div(255)
    media = torch.stack([exact, 1 - exact])
    out = reward(media, ["p", "p"], [{"image": path}, {"image": [path, "ignored.png"]}])
    assert out.scores[0].item() == pytest.approx(1.0, abs=1e-6) and out.scores[1] < 0.5
    assert torch.equal(out.components["ssim"], out.scores)
    big = torch.nn.functional.interpolate(media, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    resized = reward(big.clamp(0, 1), ["p", "p"], [{"image": path}] * 2)  # the source is resized to the edit's size
    assert resized.scores[0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="source_ssim: sample 0 has no source image"):
        reward(media[:1], ["p"], [{"group": 0}])
    with pytest.raises(ValueError, match="window must be an odd positive int"):
        SourceSSIM(window=4)
