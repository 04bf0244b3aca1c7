"""Builders shared by the adapter tests: offline byte-level BPE tokenizers and the config overrides of the
"two GRPO iterations from the shipped config" tests.

Import these helpers, never the fixtures or builders of another test module.
"""

from __future__ import annotations

import json
import os

from transformers import Qwen2Tokenizer, Qwen3Config

# A minimal Qwen3-style chat template: the pieces Flux2KleinPipeline / ZImagePipeline rely on
# (user turn, generation prompt, the empty think block when enable_thinking is False).
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode alphabet (256 symbols, one per byte): the printable Latin-1 bytes map to
    themselves, the others to ``chr(256 + i)`` (``transformers.models.gpt2.tokenization_gpt2.bytes_to_unicode``)."""
    chars = [chr(b) for b in range(33, 127)] + [chr(b) for b in range(161, 173)] + [chr(b) for b in range(174, 256)]
    return chars + [chr(256 + i) for i in range(256 - len(chars))]


def write_bpe_files(directory: str, vocab: dict[str, int], merges: list[str]) -> tuple[str, str]:
    """Add each merge's result to ``vocab`` (in place, if new) and write ``vocab.json`` / ``merges.txt`` to
    ``directory``; returns their paths."""
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    os.makedirs(directory, exist_ok=True)
    vocab_file, merges_file = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_file, "w") as f:
        json.dump(vocab, f)
    with open(merges_file, "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def qwen2_bpe_tokenizer(directory: str, merges: list[str], special_tokens: list[str],
                        chat_template: str | None = None) -> Qwen2Tokenizer:
    """A byte-level BPE Qwen2 tokenizer (every byte a token, plus ``merges``), ``<|im_end|>`` as EOS,
    ``<|endoftext|>`` as padding and ``special_tokens`` added; written to ``directory`` and read back offline."""
    vocab = {c: i for i, c in enumerate(byte_level_alphabet())}
    vocab_file, merges_file = write_bpe_files(directory, vocab, merges)
    tok = Qwen2Tokenizer(vocab_file, merges_file, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    if chat_template is not None:
        tok.chat_template = chat_template
    assert len(tok) == len(vocab) + 1 + len(special_tokens)  # transformers can silently build an empty vocabulary
    return tok


def qwen3_tokenizer(directory: str) -> Qwen2Tokenizer:
    """The byte-level Qwen2 tokenizer with Qwen3's chat / think special tokens and ``QWEN3_CHAT_TEMPLATE``
    (the text tokenizer of FLUX.2 [klein] and Z-Image)."""
    return qwen2_bpe_tokenizer(directory, ["a p", "ap p", "r e", "d o", "o g"],
                               ["<|im_start|>", "<|im_end|>", "<think>", "</think>"], QWEN3_CHAT_TEMPLATE)


def qwen3_config(vocab: int) -> Qwen3Config:
    """diffusers' dummy Qwen3 text encoder (tests/pipelines/flux2, z_image): 2 layers of width 16."""
    return Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512)


# Tiny-run settings every "two GRPO iterations from the shipped config" test uses: CPU, 2 iterations of groups
# of 2, micro-batches of 4, 2-step evaluation, no progress bar / TensorBoard.
TINY_GRPO = {"device": "cpu", "train.iterations": 2, "sampling.group_size": 2, "train.micro_batch_size": 4,
             "eval.num_steps": 2, "logging.progress": False, "logging.tensorboard": False}
# Full fine-tuning video runs (Wan, Wan I2V, HunyuanVideo 1.5, LTX-2): one prompt per iteration, 2 sampling steps,
# one evaluation sample per prompt.
VIDEO_GRPO = {"data.prompts_per_iter": 1, "sampling.num_steps": 2, "eval.samples_per_prompt": 1}
# LoRA image runs (SD3, FLUX.1 [Kontext], FLUX.2, Z-Image, Qwen-Image): fp32 rank-4 LoRA with gradient
# checkpointing, 2 prompts per iteration, 3 sampling steps, no intermediate checkpoints.
LORA_IMAGE_GRPO = {"model.dtype": "float32", "model.lora_rank": 4, "model.lora_alpha": 4,
                   "model.gradient_checkpointing": True, "data.prompts_per_iter": 2, "sampling.num_steps": 3,
                   "train.mixed_precision": "no", "train.checkpoint_every": 0, "eval.grid_prompts": 2}


def grpo_overrides(saved_dir: str, run_dir: str, train: str, evaluation: str, preset: dict | None = None,
                   **extra) -> dict:
    """``flowalign.train`` overrides for a tiny run of a shipped config: the saved tiny pipeline
    (``model.pretrained``), the output folder, the prompt files, ``TINY_GRPO``, then ``preset`` (``VIDEO_GRPO`` /
    ``LORA_IMAGE_GRPO``) and ``extra`` (dotted keys, e.g. ``**{"model.options": {...}}``) over it."""
    return {"model.pretrained": saved_dir, "output_dir": run_dir, "data.train_prompts": train,
            "eval.prompts": evaluation, **TINY_GRPO, **(preset or {}), **extra}


def add_random_lora(adapter, rank: int = 4, alpha: float = 8.0, seed: int = 1, std: float = 0.3) -> None:
    """Add a peft LoRA (``rank``, ``alpha``, the adapter's ``lora_target_modules``) to the adapter's trainable
    denoiser with ``lora_B ~ N(0, std^2)`` drawn from a generator seeded ``seed`` (peft initialises ``lora_B`` to
    zero, which would make every LoRA round-trip test vacuous)."""
    import torch
    from peft import LoraConfig

    module = adapter.trainable_module()
    module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=adapter.lora_target_modules))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def denoiser_gradients(adapter, x, sigma, cond, checkpointing: bool, guidance_scale: float = 1.0):
    """Flattened gradients of ``mean(v^2)`` (``v = adapter.predict(x [B, ...], sigma [B], cond)``) with respect to
    the trainable denoiser's parameters, with or without the module's gradient checkpointing."""
    import torch

    module = adapter.trainable_module().train()
    if checkpointing:
        module.enable_gradient_checkpointing()
    module.zero_grad()
    adapter.predict(x, sigma, cond, guidance_scale=guidance_scale).square().mean().backward()
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def assert_same_gradients(plain, checkpointed) -> None:
    """Gradient checkpointing recomputes activations only: the gradients (non-zero) must match."""
    import torch

    assert plain.abs().max() > 0
    torch.testing.assert_close(plain, checkpointed, atol=1e-6, rtol=1e-5)
