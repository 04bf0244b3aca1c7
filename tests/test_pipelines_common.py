"""Prompt-embedding cache, idle offloading and attention-backend selection."""

from __future__ import annotations

import os

import pytest
import torch

from flowalign.pipelines.common import PromptEmbeddingCache, on_device, set_attention_backend
from flowalign.pipelines.toy import build_toy_adapter


def test_cache_computes_only_missing_prompts_and_preserves_order(tmp_path):
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        return {"emb": torch.stack([torch.full((3,), float(len(p))) for p in prompts]), "mask": torch.ones(len(prompts), 2)}

    cache = PromptEmbeddingCache(str(tmp_path), namespace="enc-a")
    first = cache.get_or_compute(["a", "bbb", "a"], encode)
    assert first["emb"][:, 0].tolist() == [1.0, 3.0, 1.0] and first["mask"].shape == (3, 2)
    second = cache.get_or_compute(["cc", "bbb"], encode)
    assert second["emb"][:, 0].tolist() == [2.0, 3.0]
    assert calls == [["a", "bbb"], ["cc"]]
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) == 3
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    other = PromptEmbeddingCache(str(tmp_path), namespace="enc-b")  # another encoder never hits enc-a's entries
    other.get_or_compute(["a"], encode)
    assert calls[-1] == ["a"]


def test_cache_disabled_always_computes():
    calls = []
    cache = PromptEmbeddingCache(None, namespace="x")
    for _ in range(2):
        cache.get_or_compute(["p"], lambda ps: calls.append(ps) or {"e": torch.zeros(len(ps), 1)})
    assert len(calls) == 2


def test_real_encoder_outputs_round_trip_through_cache(tmp_path):
    adapter = build_toy_adapter(seed=1)
    compute = lambda ps: {"prompt_embeds": adapter.encode(ps).tensors["prompt_embeds"]}  # noqa: E731
    cache = PromptEmbeddingCache(str(tmp_path), namespace="toy")
    fresh = cache.get_or_compute(["a handwritten one", "the digit 7"], compute)
    cached = cache.get_or_compute(["the digit 7", "a handwritten one"], compute)
    assert torch.equal(fresh["prompt_embeds"][[1, 0]], cached["prompt_embeds"])


def test_on_device_offloads_after_the_block():
    module = torch.nn.Linear(2, 2)
    with on_device(module, "cpu", offload=True) as m:
        assert m.weight.device.type == "cpu"
    assert module.weight.device.type == "cpu"


def test_attention_backend_selection_and_error_names_backend():
    unet = build_toy_adapter().unet
    set_attention_backend(unet, None)
    set_attention_backend(unet, "native")
    with pytest.raises(ValueError, match="nonsense"):
        set_attention_backend(unet, "nonsense")
    with pytest.raises(ValueError, match="Linear"):
        set_attention_backend(torch.nn.Linear(1, 1), "native")
