"""Qwen-Image-Edit / -Edit-Plus adapters against the official ``QwenImageEditPipeline`` /
``QwenImageEditPlusPipeline``, with the tiny random Qwen-Image components of tests/qwen_image_components.py and the
same 8-bit source images on both sides.

Test-only shims (the adapter does not use them):
* torchvision is not installed here and transformers' ``Qwen2VLProcessor`` needs it for its video processor, so the
  pipelines get :class:`ImageOnlyQwen2VLProcessor` (the real PIL ``Qwen2VLImageProcessorPil`` + the offline tokenizer,
  no video processor: the pipelines never pass videos), and ``Qwen2VLProcessor.from_pretrained`` builds it when a saved
  pipeline is loaded.
* The pipelines' fixed condition areas (1024 x 1024 VAE input, 384 x 384 VL input in Edit-Plus) are patched down to
  ``VAE_AREA`` / ``VL_AREA`` so that the tiny model runs on CPU; the adapter gets the same values through its
  ``condition_area`` / ``vl_area`` options, and its defaults are checked to be the pipelines' constants.
"""

from __future__ import annotations

import json
import os

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_module
import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus_module
import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from PIL import Image
from transformers import Qwen2Tokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor

from flowalign.pipelines.qwen_image import pack_latents, unpack_latents
from flowalign.pipelines.qwen_image_edit import (VAE_CONDITION_AREA, VL_CONDITION_AREA, QwenImageEditAdapter,
                                                 QwenImageEditPlusAdapter, condition_size, to_pil)
from flowalign.rollout import sample_ode
from tests.qwen_image_components import tiny_qwen_image_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["make the apple blue", "add a small dog"]
NEGATIVES = ["blurry", " "]
RES = 32          # generated image side: latents [4, 8, 8] -> 16 noisy packed tokens
VAE_AREA = 64 * 64  # condition area: a 48 x 24 source -> 96 x 32 px -> 12 x 4 = 48 condition tokens
VL_AREA = 32 * 32
# the pipelines' own constants and helper, read before any patching
PIPELINE_VAE_AREA, PIPELINE_VL_AREA = plus_module.VAE_IMAGE_SIZE, plus_module.CONDITION_IMAGE_SIZE
EDIT_DIMENSIONS, PLUS_DIMENSIONS = edit_module.calculate_dimensions, plus_module.calculate_dimensions


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its (torchvision) video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


# saved pipelines list the real processor (model_index.json: ["transformers", "Qwen2VLProcessor"]), as a real checkpoint
ImageOnlyQwen2VLProcessor.__module__ = Qwen2VLProcessor.__module__
ImageOnlyQwen2VLProcessor.__name__ = ImageOnlyQwen2VLProcessor.__qualname__ = "Qwen2VLProcessor"


def _load_image_only(path, *args, **kwargs) -> ImageOnlyQwen2VLProcessor:
    return ImageOnlyQwen2VLProcessor(Qwen2VLImageProcessorPil.from_pretrained(path), Qwen2Tokenizer.from_pretrained(path))


@pytest.fixture(scope="module", autouse=True)
def shims():
    """The processor loader and the small condition areas (module docstring), undone after the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Qwen2VLProcessor, "from_pretrained", classmethod(lambda cls, path, *a, **k: _load_image_only(path)))
        mp.setattr(edit_module, "calculate_dimensions",
                   lambda area, ratio: EDIT_DIMENSIONS(VAE_AREA if area == PIPELINE_VAE_AREA else area, ratio))
        mp.setattr(plus_module, "VAE_IMAGE_SIZE", VAE_AREA)
        mp.setattr(plus_module, "CONDITION_IMAGE_SIZE", VL_AREA)
        yield


def _pipeline(cls, tmp: str):
    base = tiny_qwen_image_pipeline(tmp)
    return cls(**base.components, processor=ImageOnlyQwen2VLProcessor(Qwen2VLImageProcessorPil(), base.tokenizer))


@pytest.fixture(scope="module")
def edit_pipe(tmp_path_factory) -> QwenImageEditPipeline:
    return _pipeline(QwenImageEditPipeline, str(tmp_path_factory.mktemp("edit-tok")))


@pytest.fixture(scope="module")
def plus_pipe(tmp_path_factory) -> QwenImageEditPlusPipeline:
    return _pipeline(QwenImageEditPlusPipeline, str(tmp_path_factory.mktemp("plus-tok")))


@pytest.fixture(scope="module")
def plus_dir(tmp_path_factory, plus_pipe) -> str:
    d = str(tmp_path_factory.mktemp("tiny-qwen-image-edit-plus"))
    plus_pipe.save_pretrained(d)
    assert json.load(open(os.path.join(d, "model_index.json")))["processor"] == ["transformers", "Qwen2VLProcessor"]
    return d


def _arrays(n: int, size: tuple[int, int] = (24, 48), seed: int = 3) -> list[np.ndarray]:
    """``n`` smooth random 8-bit RGB images ``[H, W, 3]`` (default 48 wide, 24 high)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=gen), size=size, mode="bilinear")
    return [(c.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for c in coarse]


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


def _noise(adapter, n: int = 2, seed: int = 0) -> torch.Tensor:
    return adapter.init_latents(n, torch.Generator().manual_seed(seed))


def _official(pipe, per_prompt_images: list, x0: torch.Tensor, steps: int, cfg: float = 1.0, output_type: str = "latent",
              prompts: list[str] = PROMPTS) -> torch.Tensor:
    """The official pipeline, one prompt per call (Edit-Plus takes batch 1 only), on the same PIL sources."""
    outs = []
    for i, (prompt, images) in enumerate(zip(prompts, per_prompt_images)):
        extra = {"negative_prompt": NEGATIVES[i], "true_cfg_scale": cfg} if cfg > 1 else {"true_cfg_scale": 1.0}
        out = pipe(image=images, prompt=prompt, height=RES, width=RES, num_inference_steps=steps,
                   latents=pack_latents(x0[i: i + 1]), output_type=output_type, **extra).images
        outs.append(unpack_latents(out, RES // 4, RES // 4) if output_type == "latent" else out)
    return torch.cat(outs)


# -- pure functions -------------------------------------------------------------------------------
def test_condition_size_and_pil_conversion_match_pipelines():
    assert (VAE_CONDITION_AREA, VL_CONDITION_AREA) == (PIPELINE_VAE_AREA, PIPELINE_VL_AREA) == (1024 * 1024, 384 * 384)
    for area in (VAE_AREA, VL_AREA, 384 * 384, 1024 * 1024):
        for w, h in [(48, 24), (24, 48), (640, 480), (1000, 1000), (333, 777)]:
            assert condition_size(area, w, h) == EDIT_DIMENSIONS(area, w / h)[:2] == PLUS_DIMENSIONS(area, w / h)
    # hand-worked: 4:3 at 1024^2: w = sqrt(1048576 * 4/3) = 1182.4 -> 37 x 32 = 1184; h = 886.8 -> 28 x 32 = 896
    assert condition_size(1024 * 1024, 1024, 768) == (1184, 896)
    array = _arrays(1)[0]
    assert np.array_equal(np.asarray(to_pil(_tensor(array))), array)  # exact for 8-bit sources
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        to_pil(torch.zeros(1, 4, 4))


# -- fidelity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_edit_ode_rollout_reproduces_pipeline(edit_pipe, cfg):
    adapter = QwenImageEditAdapter(edit_pipe, resolution=RES, condition_area=VAE_AREA)
    arrays, x0 = _arrays(2), _noise(adapter)
    cond = adapter.encode(PROMPTS, NEGATIVES if cfg > 1 else None, images=[[_tensor(a)] for a in arrays])
    assert cond.tensors["image_latents"].shape == (2, 48, 16) and cond.tensors["image_shapes"].tolist() == [[[1, 4, 12]]] * 2
    ours = sample_ode(adapter, cond, 3, latents=x0, guidance_scale=cfg)
    ref = _official(edit_pipe, [Image.fromarray(a) for a in arrays], x0, 3, cfg)
    assert ours.abs().max() > 0.1 and torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    torch.testing.assert_close(adapter.sigmas(3), edit_pipe.scheduler.sigmas, atol=1e-6, rtol=0)
    if cfg > 1:
        torch.testing.assert_close(cond.negative["image_latents"], cond.tensors["image_latents"])
        ref_images = _official(edit_pipe, [Image.fromarray(a) for a in arrays], x0, 3, cfg, output_type="pt")
        torch.testing.assert_close(adapter.decode(ours), ref_images, atol=1e-4, rtol=0)
    else:  # the source image matters
        other = adapter.encode(PROMPTS, images=[[_tensor(a)] for a in _arrays(2, seed=9)])
        assert (sample_ode(adapter, other, 3, latents=x0) - ours).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_edit_plus_multi_image_rollout_reproduces_pipeline(plus_pipe, cfg):
    adapter = QwenImageEditPlusAdapter(plus_pipe, resolution=RES, condition_area=VAE_AREA, vl_area=VL_AREA)
    arrays, x0 = _arrays(4), _noise(adapter)
    images = [[_tensor(arrays[0]), _tensor(arrays[1])], [_tensor(arrays[2]), _tensor(arrays[3])]]
    cond = adapter.encode(PROMPTS, NEGATIVES if cfg > 1 else None, images=images)
    assert cond.tensors["image_latents"].shape == (2, 96, 16)  # two sources of 48 tokens each
    ours = sample_ode(adapter, cond, 3, latents=x0, guidance_scale=cfg)
    pils = [[Image.fromarray(arrays[0]), Image.fromarray(arrays[1])], [Image.fromarray(arrays[2]), Image.fromarray(arrays[3])]]
    ref = _official(plus_pipe, pils, x0, 3, cfg)
    assert ours.abs().max() > 0.1 and torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_options_image_counts_and_mixed_grids(plus_dir, edit_pipe):
    with pytest.raises(ValueError, match="max_sequence_length"):
        QwenImageEditPlusAdapter.from_pretrained(plus_dir, max_sequence_length=64)
    with pytest.raises(ValueError, match="condition_area=100"):
        QwenImageEditPlusAdapter.from_pretrained(plus_dir, condition_area=100)
    edit = QwenImageEditAdapter(edit_pipe, resolution=RES, condition_area=VAE_AREA)
    wide, tall = _tensor(_arrays(1)[0]), _tensor(_arrays(1, size=(48, 24))[0])
    with pytest.raises(ValueError, match="exactly one source image per prompt; prompt 0 has 2"):
        edit.encode(PROMPTS, images=[[wide, wide], [wide]])
    with pytest.raises(ValueError, match="images=.*required"):
        edit.encode(PROMPTS)
    with pytest.raises(ValueError, match="same condition grids"):
        edit.encode(PROMPTS, images=[[wide], [tall]])


# -- LoRA -----------------------------------------------------------------------------------------
def test_edit_plus_lora_round_trips_into_official_pipeline(plus_dir, tmp_path):
    from peft import LoraConfig

    options = {"resolution": RES, "condition_area": VAE_AREA, "vl_area": VL_AREA}
    adapter = QwenImageEditPlusAdapter.from_pretrained(plus_dir, embedding_cache_dir=str(tmp_path / "cache"), **options)
    arrays, x0 = _arrays(2), _noise(adapter)
    images = [[_tensor(arrays[0])], [_tensor(arrays[1])]]
    cond = adapter.encode(PROMPTS, images=images)
    assert len(os.listdir(tmp_path / "cache")) == 2  # one entry per (prompt, sources)
    torch.testing.assert_close(adapter.encode(PROMPTS, images=images).tensors["prompt_embeds"], cond.tensors["prompt_embeds"])
    before = sample_ode(adapter, cond, 2, latents=x0)
    adapter.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=adapter.lora_target_modules))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapter.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    lora_out = sample_ode(adapter, cond, 2, latents=x0)
    assert (lora_out - before).abs().max() > 1e-3
    adapter.save_lora_weights(str(tmp_path / "lora"))
    official = QwenImageEditPlusPipeline.from_pretrained(plus_dir)
    official.load_lora_weights(str(tmp_path / "lora"))
    ref = _official(official, [[Image.fromarray(a)] for a in arrays], x0, 2)
    torch.testing.assert_close(lora_out, ref, atol=1e-4, rtol=0)
    adapter.save_pretrained(str(tmp_path / "merged"))
    merged = QwenImageEditPlusAdapter.from_pretrained(str(tmp_path / "merged"), **options)
    assert not merged.has_lora()
    torch.testing.assert_close(sample_ode(merged, merged.encode(PROMPTS, images=images), 2, latents=x0), lora_out,
                               atol=1e-4, rtol=0)


def test_edit_gradient_checkpointing_gives_same_gradients(tmp_path):
    grads = []
    for checkpointing in (False, True):
        adapter = QwenImageEditAdapter(_pipeline(QwenImageEditPipeline, str(tmp_path)), resolution=RES, condition_area=VAE_AREA)
        module = adapter.trainable_module().train()
        if checkpointing:
            module.enable_gradient_checkpointing()
        cond = adapter.encode(PROMPTS, NEGATIVES, images=[[_tensor(a)] for a in _arrays(2)])
        adapter.predict(_noise(adapter), torch.tensor([0.7, 0.3]), cond, guidance_scale=3.0).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# -- recipe ---------------------------------------------------------------------------------------
def _edit_prompt_files(folder) -> tuple[str, str]:
    """JSONL prompt files whose records name two PNG source images each (relative to the file's folder)."""
    os.makedirs(folder / "img", exist_ok=True)
    for i, array in enumerate(_arrays(4)):
        Image.fromarray(array).save(folder / "img" / f"{i}.png")
    train, evaluation = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("".join(json.dumps({"prompt": p, "image": [f"img/{2 * i}.png", f"img/{2 * i + 1}.png"]}) + "\n"
                             for i, p in enumerate(PROMPTS)))
    evaluation.write_text(json.dumps({"prompt": "make it red", "image": ["img/1.png", "img/2.png"]}) + "\n")
    return str(train), str(evaluation)


@pytest.mark.slow
def test_edit_plus_grpo_config_runs_two_iterations(plus_dir, tmp_path):
    """The shipped config with tiny overrides: real recipe, tiny saved components, CPU, two source images per record."""
    import flowalign

    train, evaluation = _edit_prompt_files(tmp_path)
    options = {"resolution": RES, "condition_area": VAE_AREA, "vl_area": VL_AREA, "embedding_cache_dir": str(tmp_path / "cache")}
    overrides = {"model.pretrained": plus_dir, "model.dtype": "float32", "model.lora_rank": 4, "model.lora_alpha": 4,
                 "model.gradient_checkpointing": True, "model.options": options, "output_dir": str(tmp_path / "run"),
                 "device": "cpu", "data.train_prompts": train, "data.prompts_per_iter": 2, "sampling.group_size": 2,
                 "sampling.num_steps": 3, "sampling.sde_window": [0, 2], "train.iterations": 2,
                 "train.micro_batch_size": 4, "train.mixed_precision": "no",
                 "train.checkpoint_every": 0, "eval.prompts": evaluation, "eval.num_steps": 2,
                 "eval.samples_per_prompt": 2, "eval.grid_prompts": 1, "logging.progress": False,
                 "logging.tensorboard": False, "rewards": [{"_component_": "source_ssim", "weight": 1.0}]}
    summary = flowalign.train(os.path.join(REPO, "configs/grpo/qwen_image_edit_plus_ssim.yaml"), overrides)
    assert summary["iterations"] == 2 and np.isfinite(summary["after"]["eval/reward"])
    assert -1 <= summary["after"]["eval/reward"] <= 1  # an SSIM against the first source image
    assert os.path.exists(tmp_path / "run" / "final" / "model_index.json")
    assert os.path.exists(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors")
