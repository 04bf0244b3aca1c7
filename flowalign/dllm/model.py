"""Masked diffusion LM adapter: any Hugging Face masked LM with a mask token, LLaDA, Dream.

:class:`MaskedDiffusionLM` wraps a transformers model so that calling it is a *logits function*
(``(input_ids [B, L], attention_mask [B, L] | None) -> logits [B, L, V]`` float32, the logits at
position ``i`` being the distribution of token ``i``), which is what ``flowalign.dllm.sampling`` and
``flowalign.dllm.logprob`` consume.

Loading (``from_pretrained``): ``AutoModelForMaskedLM`` first (BERT-style and any remote-code model
whose ``auto_map`` registers it); models that only expose ``AutoModel`` with
``trust_remote_code=True`` (LLaDA, Dream) fall back to ``AutoModel``, whose output must carry
``.logits``.  Dream is trained as a shifted AR-initialised model: its raw logits at position ``i``
predict token ``i + 1``, and Dream's own sampler undoes that with
``logits = cat([logits[:, :1], logits[:, :-1]], 1)``; we apply the same shift when
``shift_logits`` is true (auto-detected from ``config.model_type == "Dream"``).  For Dream a padded
2-D attention mask is turned into the 4-D boolean mask and position ids its sampler builds.

The mask token comes from the tokenizer (``mask_token_id`` or a known mask string such as LLaDA's
``<|mdm_mask|>``), then ``config.mask_token_id``, then a table of known model types (LLaDA: 126336).

LoRA (``lora_rank > 0``) wraps the model with peft; :meth:`disable_adapter` then yields the
reference policy.  :meth:`save_pretrained` writes the full model + tokenizer, or the LoRA adapter +
tokenizer with a note of the base model, plus ``flowalign_dllm.json`` (mask id, shift) so that
:meth:`from_pretrained` restores the same object.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import torch
from torch import Tensor

#: Mask token ids of model families whose tokenizer/config do not declare one.
KNOWN_MASK_IDS: dict[str, int] = {"llada": 126336}
#: Mask token strings looked up in the vocabulary when ``tokenizer.mask_token_id`` is unset.
KNOWN_MASK_TOKENS: tuple[str, ...] = ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>")
#: ``config.model_type`` values (lower case) whose logits are shifted (position i predicts i + 1).
SHIFTED_MODEL_TYPES: frozenset[str] = frozenset({"dream"})
META_FILE = "flowalign_dllm.json"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _looks_local(path: str) -> bool:
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1


def shift_logits_right(logits: Tensor) -> Tensor:
    """Dream's shift: ``[B, L, V]`` raw logits (position i predicts i+1) -> position i predicts i.

    Position 0 has no predictor and keeps the raw logits at 0, exactly as Dream's sampler does.
    """
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    """Full names of every ``nn.Linear`` in ``model`` except the output (vocabulary) projection."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not out_emb]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to put LoRA on; "
                         "pass lora_target_modules explicitly")
    return names


class MaskedDiffusionLM(torch.nn.Module):
    """A masked diffusion LM as a logits function (see module docstring).

    Attributes: ``tokenizer``, ``mask_token_id``, ``eos_token_id``, ``pad_token_id``,
    ``shift_logits``, ``model`` (the transformers model, a peft ``PeftModel`` when LoRA is on),
    ``base_path`` (where the base weights came from), ``model_type``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, mask_token_id: int, eos_token_id: int,
                 pad_token_id: int, shift_logits: bool, base_path: str = "", model_type: str = "") -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.mask_token_id = int(mask_token_id)
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self.shift_logits = bool(shift_logits)
        self.base_path = base_path
        self.model_type = model_type

    # ------------------------------------------------------------------------------------------
    # loading
    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        shift_logits: bool | None = None,
        lora_rank: int = 0,
        lora_alpha: float = 0.0,
        lora_target_modules: list[str] | None = None,
        lora_dropout: float = 0.0,
        mask_token_id: int | None = None,
    ) -> MaskedDiffusionLM:
        """Load a model + tokenizer from a local directory or hub id.

        ``shift_logits=None`` auto-detects (saved note, else Dream model type); a bool overrides.
        ``lora_alpha=0`` means ``lora_alpha = lora_rank`` (LoRA scale 1).  A directory written by
        :meth:`save_pretrained` with an adapter reloads the base model and the (trainable) adapter.
        """
        from transformers import AutoConfig, AutoTokenizer

        if not isinstance(path_or_id, str) or not path_or_id:
            raise ValueError(f"path_or_id must be a non-empty string, got {path_or_id!r}")
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
        torch_dtype = _resolve_dtype(dtype)
        is_dir = os.path.isdir(path_or_id)
        if not is_dir and (os.path.exists(path_or_id) or _looks_local(path_or_id)):
            raise FileNotFoundError(f"MaskedDiffusionLM.from_pretrained: {path_or_id!r} is not a model directory "
                                    "(and does not look like a hub id 'org/name')")
        meta: dict = {}
        if is_dir and os.path.isfile(os.path.join(path_or_id, META_FILE)):
            with open(os.path.join(path_or_id, META_FILE)) as fh:
                meta = json.load(fh)
        adapter_dir = path_or_id if is_dir and os.path.isfile(os.path.join(path_or_id, "adapter_config.json")) else None
        base_path = path_or_id
        if adapter_dir is not None:
            with open(os.path.join(adapter_dir, "adapter_config.json")) as fh:
                base_path = meta.get("base_path") or json.load(fh).get("base_model_name_or_path") or ""
            if not base_path:
                raise ValueError(f"adapter in {path_or_id!r} does not name its base model "
                                 f"(no 'base_path' in {META_FILE}, no base_model_name_or_path)")
            trust_remote_code = trust_remote_code or bool(meta.get("trust_remote_code", False))
        try:
            config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
        except Exception as exc:  # transformers raises OSError/ValueError with its own wording
            raise OSError(f"MaskedDiffusionLM.from_pretrained: cannot load a config from {base_path!r}: {exc}") from exc
        model = cls._load_model(base_path, config, torch_dtype, trust_remote_code)
        tok_src = adapter_dir if adapter_dir and os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json")) else base_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_src, trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise OSError(f"MaskedDiffusionLM.from_pretrained: cannot load a tokenizer from {tok_src!r}: {exc}") from exc
        if len(tokenizer) == 0:
            raise ValueError(f"tokenizer loaded from {tok_src!r} has an empty vocabulary")

        model_type = str(getattr(config, "model_type", "") or "")
        mid = mask_token_id if mask_token_id is not None else meta.get("mask_token_id")
        if mid is None:
            mid = cls._find_mask_id(tokenizer, config, model_type)
        if mid is None:
            raise ValueError(f"no mask token found for {path_or_id!r}: tokenizer.mask_token_id is None, none of "
                             f"{list(KNOWN_MASK_TOKENS)} is in the vocabulary, config has no mask_token_id and "
                             f"model_type {model_type!r} is not in {sorted(KNOWN_MASK_IDS)}; pass mask_token_id=")
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is None:
            raise ValueError(f"no EOS token for {path_or_id!r}: neither tokenizer.eos_token_id nor config.eos_token_id is set")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else getattr(config, "pad_token_id", None)
        if pad is None:
            pad = eos
        if shift_logits is None:
            shift_logits = bool(meta["shift_logits"]) if "shift_logits" in meta else model_type.lower() in SHIFTED_MODEL_TYPES

        vocab = getattr(config, "vocab_size", None)
        if vocab is not None and not 0 <= int(mid) < int(vocab):
            raise ValueError(f"mask token id {mid} of {path_or_id!r} is outside the vocabulary (size {vocab})")

        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
        elif lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            targets = list(lora_target_modules) if lora_target_modules else default_lora_targets(model)
            lcfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha if lora_alpha > 0 else float(lora_rank),
                              lora_dropout=lora_dropout, target_modules=targets, bias="none")
            try:
                model = get_peft_model(model, lcfg)
            except ValueError as exc:
                raise ValueError(f"lora_target_modules={targets!r} do not match modules of {path_or_id!r}: {exc}") from exc
        model.to(device)
        model.eval()
        return cls(model, tokenizer, mask_token_id=int(mid), eos_token_id=int(eos), pad_token_id=int(pad),
                   shift_logits=bool(shift_logits), base_path=base_path if adapter_dir else path_or_id,
                   model_type=model_type)

    @staticmethod
    def _load_model(path: str, config, torch_dtype: torch.dtype, trust_remote_code: bool) -> torch.nn.Module:
        from transformers import AutoModel, AutoModelForMaskedLM

        errors = []
        for auto in (AutoModelForMaskedLM, AutoModel):
            if auto is AutoModel and not trust_remote_code and not getattr(config, "auto_map", None):
                # a built-in base model (e.g. BertModel) has no LM head: never a valid fallback
                break
            try:
                return auto.from_pretrained(path, config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
            except (ValueError, KeyError) as exc:
                errors.append(f"{auto.__name__}: {exc}")
            except OSError as exc:
                raise OSError(f"MaskedDiffusionLM.from_pretrained: cannot load weights from {path!r}: {exc}") from exc
        raise ValueError(f"MaskedDiffusionLM.from_pretrained: {path!r} loads neither as AutoModelForMaskedLM nor "
                         f"(with trust_remote_code=True) as AutoModel: " + " | ".join(errors))

    @staticmethod
    def _find_mask_id(tokenizer, config, model_type: str) -> int | None:
        if getattr(tokenizer, "mask_token_id", None) is not None:
            return int(tokenizer.mask_token_id)
        vocab = tokenizer.get_vocab()
        for tok in KNOWN_MASK_TOKENS:
            if tok in vocab:
                return int(vocab[tok])
        if getattr(config, "mask_token_id", None) is not None:
            return int(config.mask_token_id)
        return KNOWN_MASK_IDS.get(model_type.lower())

    # ------------------------------------------------------------------------------------------
    # the logits function
    # ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_lora(self) -> bool:
        return hasattr(self.model, "peft_config")

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``input_ids [B, L]`` long, ``attention_mask [B, L]`` (1 = real token) -> logits ``[B, L, V]``
        float32, position ``i`` giving the distribution of token ``i`` (Dream shift undone)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        dev = self.device
        input_ids = input_ids.to(dev)
        kwargs: dict = {}
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            attention_mask = attention_mask.to(dev)
            if self.model_type.lower() == "dream":
                if bool((attention_mask == 0).any()):
                    # Dream's sampler: 4-D boolean mask and positions counted over real tokens only
                    am = attention_mask.bool()
                    kwargs["attention_mask"] = am[:, None, None, :] & am[:, None, :, None]
                    pos = attention_mask.long().cumsum(-1) - 1
                    kwargs["position_ids"] = pos.masked_fill(attention_mask == 0, 1)
                else:
                    kwargs["attention_mask"] = "full"
            else:
                kwargs["attention_mask"] = attention_mask
        out = self.model(input_ids=input_ids, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
            raise ValueError(f"model returned logits of shape {tuple(logits.shape)} for input {tuple(input_ids.shape)}")
        logits = logits.float()
        if self.shift_logits:
            logits = shift_logits_right(logits)
        return logits

    # ------------------------------------------------------------------------------------------
    # text
    # ------------------------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, got a single str")
        return [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]

    def decode(self, completion_ids: Tensor) -> list[str]:
        """``[B, Lg]`` completion tokens -> text of the tokens before the first EOS (per row)."""
        if completion_ids.dim() != 2:
            raise ValueError(f"completion_ids must be [B, Lg], got shape {tuple(completion_ids.shape)}")
        out = []
        for row in completion_ids.tolist():
            if self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id)]
            out.append(self.tokenizer.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False))
        return out

    def pad_prompts(self, ids: list[list[int]], length: int | None = None) -> tuple[Tensor, Tensor]:
        """Left-pad prompt ids with ``pad_token_id``: returns ids ``[B, P]`` long and attention mask
        ``[B, P]`` long (0 on padding), ``P`` = ``length`` or, when ``None``, the longest prompt.

        A model without padding-aware positions (LLaDA, BERT) sees a prompt differently under
        different padding, so a recipe that splits a batch over processes pads every share to the
        whole batch's ``length``."""
        if not ids:
            raise ValueError("pad_prompts needs at least one prompt")
        longest = max(len(r) for r in ids)
        if length is not None and length < longest:
            raise ValueError(f"pad_prompts: length {length} is shorter than the longest prompt ({longest} tokens)")
        P = longest if length is None else int(length)
        out = torch.full((len(ids), P), self.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(ids), P), dtype=torch.long)
        for i, r in enumerate(ids):
            if len(r):
                out[i, P - len(r):] = torch.tensor(list(r), dtype=torch.long)
                att[i, P - len(r):] = 1
        return out, att

    # ------------------------------------------------------------------------------------------
    # training helpers
    # ------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters with ``requires_grad`` (LoRA factors only when LoRA is on)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context in which the LoRA adapter is off: the model is the reference policy."""
        if not self.has_lora:
            raise RuntimeError("disable_adapter() needs a LoRA model (from_pretrained(..., lora_rank>0)); "
                               "without LoRA keep a frozen copy of the model as the reference instead")
        with self.model.disable_adapter():
            yield

    def save_pretrained(self, path: str) -> None:
        """Write the model (or, with LoRA, only the adapter), the tokenizer and ``flowalign_dllm.json``."""
        os.makedirs(path, exist_ok=True)
        meta = {"mask_token_id": self.mask_token_id, "shift_logits": self.shift_logits,
                "model_type": self.model_type}
        if self.has_lora:
            base = os.path.abspath(self.base_path) if os.path.isdir(self.base_path) else self.base_path
            meta["base_path"] = base
            meta["trust_remote_code"] = bool(getattr(self.model.get_base_model().config, "auto_map", None))
        with _transformers_progress_bars_off():  # a "Writing model shards" bar would cut through the training bar
            self.model.save_pretrained(path, **self._whole_state_dict())
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, META_FILE), "w") as fh:
            json.dump(meta, fh, indent=2)

    def _whole_state_dict(self) -> dict:
        """``{}`` for an unsharded model (the inner model's writer reads its own ``state_dict()``);
        for one sharded with FSDP2 (:func:`flowalign.training.fsdp.shard_module`), ``{"state_dict":
        ...}``: the inner model's whole tensors, which ``self.state_dict()`` returns inside
        ``Recipe.full_weights()`` (:func:`flowalign.training.fsdp.state_dict_view`), for
        transformers' / peft's ``save_pretrained(state_dict=...)``.

        Raises:
            RuntimeError: a sharded model's weights are not gathered (called outside ``full_weights()``).
        """
        from torch.distributed.tensor import DTensor

        from flowalign.training.fsdp import is_sharded

        if not is_sharded(self):
            return {}
        state = {k[len("model."):]: v for k, v in self.state_dict().items() if k.startswith("model.")}
        if any(isinstance(v, DTensor) for v in state.values()):
            raise RuntimeError("save_pretrained of a sharded MaskedDiffusionLM needs its weights gathered: call it on the "
                               "main rank inside Recipe.full_weights(), which every rank enters")
        # tied weights (a masked LM's decoder and input embeddings) were gathered once per name: give every
        # name of one parameter the same tensor, so that the writer drops the tied copies as it does unsharded
        first: dict[int, str] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            owner = first.setdefault(id(param), name)
            if owner != name and name in state and owner in state:
                state[name] = state[owner]
        return {"state_dict": state}


@contextlib.contextmanager
def _transformers_progress_bars_off() -> Iterator[None]:
    """Silence transformers' own tqdm bars for the duration, restoring the previous setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
