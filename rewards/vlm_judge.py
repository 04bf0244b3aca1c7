"""A pairwise VLM judge: ``compare(media_a, media_b, prompts) -> P(a is better)`` (UnifiedReward-style).

Pairwise judging (UnifiedReward, Wang et al. 2025; used as the preference model of Pref-GRPO) shows
a vision-language model the prompt and both images and asks which one is better. Two back-ends:

* **local**: any transformers ``AutoModelForImageTextToText`` whose processor has a chat template.
  The answer is read from the next-token logits: ``P(A) = softmax(l_A, l_B)[0]`` over the tokens
  ``"A"`` and ``"B"`` after the generation prompt (no sampling, so the judge is deterministic).
* **endpoint**: an OpenAI-compatible ``/chat/completions`` server (``base_url``, ``model``, the
  API key read from the environment variable named ``api_key_env``); images travel as base64 PNG
  data URLs; timeouts and retries with backoff; the reply's first standalone ``A``/``B`` gives
  ``P(A) = 1`` or ``0``. A failure or an unparsable reply gives ``0.5`` and ``valid=False``.

Editing (``use_source=True``): the judge also sees each sample's source image(s), read from the prompt
record's ``metadata["image"]`` (one path or a list of paths, as the editing recipes store them). The chat
message shows ``Source image:`` (``Source image 1:`` ... for several) before ``Image A:`` / ``Image B:``
and asks with :data:`DEFAULT_EDIT_QUESTION` (``{prompt}`` is the edit instruction) which edit follows the
instruction while preserving the rest of the source. Both back-ends send the same images in that order.

Wrap the judge with :class:`flowalign.rewards.groupwise.PairwiseAsPointwise` for per-sample win rates
(it passes each pair's metadata on to judges with ``needs_metadata = True``, which ``use_source`` sets).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch
from PIL import Image
from torch import Tensor

from ._media import check_media, to_pil_images
from .base import RewardOutput

__all__ = ["VLMJudge", "png_data_url", "parse_choice", "source_paths", "DEFAULT_QUESTION", "DEFAULT_EDIT_QUESTION"]

DEFAULT_QUESTION = (
    "You are given a text prompt and two images generated from it, Image A and Image B.\n"
    "Prompt: {prompt}\n"
    "Which image matches the prompt better and has higher visual quality? Answer A or B."
)
DEFAULT_EDIT_QUESTION = (
    "You are given the source image(s) above, an editing instruction, and two edited images, Image A and Image B.\n"
    "Instruction: {prompt}\n"
    "Which edit follows the instruction better while keeping the rest of the source image unchanged, "
    "with higher visual quality? Answer A or B."
)
_CHOICE = re.compile(r"\b([AB])\b")


def png_data_url(image: Image.Image) -> str:
    """``data:image/png;base64,...`` for a PIL image (lossless, so the judge sees the exact pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def parse_choice(text: Any) -> float | None:
    """``1.0`` if the reply's first standalone letter choice is ``A``, ``0.0`` for ``B``, else ``None``."""
    if not isinstance(text, str):
        return None
    match = _CHOICE.search(text.strip().strip("*\"'`"))
    return None if match is None else (1.0 if match.group(1) == "A" else 0.0)


def source_paths(meta: Any, i: int) -> list[str]:
    """The source image path(s) of sample ``i`` from its metadata record (``"image"``: a path or a list of paths).

    Raises:
        ValueError: naming the sample and ``metadata["image"]`` when the record has no source path.
    """
    image = meta.get("image") if isinstance(meta, dict) else None
    paths = [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"vlm_judge (use_source=True): sample {i} has no source image: its prompt record needs "
                         f"\"image\": \"path.png\" (or a list of paths), got metadata {meta!r}")
    return paths


class VLMJudge:
    """Pairwise judge over a local VLM (``path``) or an OpenAI-compatible endpoint (``base_url`` + ``model``).

    Args:
        path: local/hub ``AutoModelForImageTextToText`` checkpoint with its processor (local back-end).
        base_url: e.g. ``"http://127.0.0.1:8000/v1"`` (endpoint back-end); ``model``: its model name.
        api_key_env: name of the environment variable holding the API key (sent as a Bearer token if set).
        question: the instruction, with ``{prompt}`` for the generation prompt (default: :data:`DEFAULT_QUESTION`,
            or :data:`DEFAULT_EDIT_QUESTION` with ``use_source``).
        use_source: editing judge: show each sample's source image(s) (``metadata["image"]``) before the two edits.
        timeout, retries, max_workers: endpoint request timeout (s), extra attempts, parallel requests.
        device, batch_size: local back-end placement and pairs per forward pass.
    """

    name = "vlm_judge"
    modality = "image"

    def __init__(self, path: str | None = None, base_url: str | None = None, model: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", question: str | None = None, timeout: float = 60.0,
                 retries: int = 2, max_workers: int = 8, device: str = "cpu", batch_size: int = 8,
                 use_source: bool = False) -> None:
        if (path is None) == (base_url is None):
            raise ValueError("VLMJudge: give exactly one of path (local VLM) or base_url (OpenAI-compatible endpoint)")
        if not isinstance(use_source, bool):
            raise ValueError(f"VLMJudge: use_source must be true or false, got {use_source!r}")
        if question is None:
            question = DEFAULT_EDIT_QUESTION if use_source else DEFAULT_QUESTION
        if "{prompt}" not in question:
            raise ValueError(f"VLMJudge: question must contain '{{prompt}}', got {question!r}")
        if timeout <= 0 or retries < 0 or max_workers < 1 or batch_size < 1:
            raise ValueError(f"VLMJudge: need timeout > 0, retries >= 0, max_workers >= 1, batch_size >= 1; got "
                             f"{timeout}, {retries}, {max_workers}, {batch_size}")
        self.question, self.timeout, self.retries, self.max_workers = question, float(timeout), int(retries), max_workers
        self.batch_size, self.device = batch_size, torch.device(device)
        self.use_source = self.needs_metadata = use_source  # PairwiseAsPointwise passes metadata when set
        self.base_url, self.model_name, self.api_key_env = base_url, model, api_key_env
        if base_url is not None:
            if not model:
                raise ValueError("VLMJudge: base_url needs model= (the endpoint's model name)")
            self.base_url = base_url.rstrip("/")
            return
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"  # the last position is the answer slot for every row
        self.model = AutoModelForImageTextToText.from_pretrained(path).to(self.device).eval().requires_grad_(False)
        ids = [self.processor.tokenizer.encode(c, add_special_tokens=False) for c in ("A", "B")]
        if any(len(i) != 1 for i in ids) or ids[0] == ids[1]:
            raise ValueError(f"VLMJudge: 'A' / 'B' must be single distinct tokens of {path!r}'s tokenizer, got {ids}")
        self.choice_ids = [ids[0][0], ids[1][0]]

    def _content(self, prompt: str, images: Sequence[Any]) -> list[dict[str, Any]]:
        """The user turn's content: ``[sources..., A, B]`` images, each after its label, then the question.

        ``images`` holds one item per shown image (``len - 2`` sources first); each item is the chat part
        of that image (``{"type": "image"}`` for the local processor, an ``image_url`` part for the endpoint)."""
        n_src = len(images) - 2
        labels = ["Source image:"] if n_src == 1 else [f"Source image {k + 1}:" for k in range(n_src)]
        content: list[dict[str, Any]] = []
        for label, part in zip(labels + ["Image A:", "Image B:"], images):
            content += [{"type": "text", "text": label}, part]
        return content + [{"type": "text", "text": self.question.format(prompt=prompt)}]

    def _messages(self, prompt: str, n_sources: int = 0) -> list[dict[str, Any]]:
        """Chat messages for the local processor, with ``n_sources`` source images before A and B."""
        return [{"role": "user", "content": self._content(prompt, [{"type": "image"}] * (n_sources + 2))}]

    def _sources(self, metadata: Sequence[Any] | None, batch: int) -> list[list[Image.Image]]:
        """Per pair its source images as PIL (empty lists without ``use_source``)."""
        if not self.use_source:
            return [[] for _ in range(batch)]
        from flowalign.data.images import load_image

        if metadata is None or len(metadata) != batch:
            raise ValueError(f"vlm_judge (use_source=True): needs one metadata record with \"image\" per pair, got "
                             f"{'none' if metadata is None else len(metadata)} for {batch} pairs")
        return [[to_pil_images(load_image(path, where=f"vlm_judge: sample {i}")[None])[0] for path in source_paths(m, i)]
                for i, m in enumerate(metadata)]

    @torch.no_grad()
    def _local(self, a: list[Image.Image], b: list[Image.Image], prompts: Sequence[str],
               sources: list[list[Image.Image]]) -> Tensor:
        """``P(A)`` ``[P]`` from the next-token logits of ``"A"`` vs ``"B"``; each row shows ``sources[i] + [a, b]``."""
        probs = []
        for k in range(0, len(prompts), self.batch_size):
            rows = range(k, min(k + self.batch_size, len(prompts)))
            texts = [self.processor.apply_chat_template(self._messages(prompts[i], len(sources[i])),
                                                        add_generation_prompt=True, tokenize=False) for i in rows]
            images = [im for i in rows for im in (*sources[i], a[i], b[i])]  # in the order of the <image> slots
            inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True).to(self.device)
            logits = self.model(**inputs).logits[:, -1, self.choice_ids].float()
            probs.append(logits.softmax(-1)[:, 0].cpu())
        return torch.cat(probs)

    def _request(self, image_a: Image.Image, image_b: Image.Image, prompt: str,
                 sources: Sequence[Image.Image] = ()) -> float | None:
        """One chat-completions call (``sources`` shown first); ``P(A)`` in {0, 1}, or ``None`` after all retries failed."""
        content = self._content(prompt, [{"type": "image_url", "image_url": {"url": png_data_url(im)}}
                                         for im in (*sources, image_a, image_b)])
        body = json.dumps({"model": self.model_name, "messages": [{"role": "user", "content": content}],
                           "temperature": 0, "max_tokens": 8}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
            try:
                req = urllib.request.Request(self.base_url + "/chat/completions", data=body, headers=headers)
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read().decode())
                return parse_choice(reply["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as err:
                if err.code < 500 and err.code != 429:
                    return None  # a client error does not go away on retry
            except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError, IndexError, TypeError):
                pass
        return None

    def compare(self, media_a: Tensor, media_b: Tensor, prompts: Sequence[str],
                metadata: Sequence[dict[str, Any]] | None = None) -> RewardOutput:
        """``P(a ≻ b)`` ``[B]`` for image batches ``[B, 3, H, W]`` in [0, 1]; ``valid`` False where judging failed.

        ``metadata`` (``[B]`` records) is read only with ``use_source``: each record's ``"image"`` path(s)."""
        media_a, media_b = check_media(media_a, "image"), check_media(media_b, "image")
        if not media_a.shape[0] == media_b.shape[0] == len(prompts):
            raise ValueError(f"VLMJudge.compare: media_a has {media_a.shape[0]} images, media_b {media_b.shape[0]}, "
                             f"prompts {len(prompts)}")
        a, b = to_pil_images(media_a), to_pil_images(media_b)
        sources = self._sources(metadata, len(prompts))
        if self.base_url is None:
            p = self._local(a, b, list(prompts), sources)
            valid = torch.isfinite(p)
        else:
            with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
                answers = list(pool.map(self._request, a, b, prompts, sources))
            valid = torch.tensor([x is not None for x in answers])
            p = torch.tensor([0.5 if x is None else x for x in answers], dtype=torch.float32)
        p = torch.where(valid, p, torch.full_like(p, 0.5))
        dev = media_a.device
        return RewardOutput(scores=p.to(dev), components={"p_a": p.to(dev)}, valid=valid.to(dev))

    @classmethod
    def tiny(cls, tmp_dir: str, seed: int = 0, **kwargs: Any) -> "VLMJudge":
        """Tests only: a random tiny LLaVA (CLIP vision + Llama) with a byte-level BPE tokenizer, saved and reloaded."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                                  LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

        byte_chars = pre_tokenizers.ByteLevel.alphabet()
        vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
        core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      additional_special_tokens=["<image>"])
        template = ("{% for m in messages %}<s>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
                    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}"
                    "{% endif %}{% endfor %}{% endif %}</s>\n{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")
        processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                      crop_size={"height": 32, "width": 32}),
                                   tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                                   chat_template=template, num_additional_image_tokens=1)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8)
        text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                             vision_feature_select_strategy="default", vision_feature_layer=-1)
        torch.manual_seed(seed)
        LlavaForConditionalGeneration(config).save_pretrained(tmp_dir)
        processor.save_pretrained(tmp_dir)
        return cls(path=tmp_dir, **kwargs)
