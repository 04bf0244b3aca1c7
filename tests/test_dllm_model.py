"""MaskedDiffusionLM (flowalign.dllm.model) and the masked-diffusion objective (flowalign.dllm.pretrain).

Real transformers classes with tiny configs, saved to tmp_path and reloaded offline; two
trust_remote_code models (LLaDA-like, Dream-like with shifted logits) written into tmp_path.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random

import pytest
import torch

from flowalign.dllm.model import (
    MaskedDiffusionLM,
    default_lora_targets,
    shift_logits_right,
)
from flowalign.dllm.pretrain import (
    build_sequences,
    examples_to_sequences,
    flawed_addition_pairs,
    masked_diffusion_loss,
    pretrain_steps,
    sample_mask_ratios,
)

CHARS = list("0123456789+=")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster (and steadier on a shared 2-core machine) on one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def char_tokenizer(specials: list[str], **special_kwargs):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[1]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, **special_kwargs)


def bert_dir(tmp_path, *, with_mask: bool = True, name: str = "bert"):
    from transformers import BertConfig, BertForMaskedLM

    specials = ["[PAD]", "[UNK]", "[MASK]", "[EOS]"] if with_mask else ["[PAD]", "[UNK]", "[EOS]"]
    kw = {"pad_token": "[PAD]", "unk_token": "[UNK]", "eos_token": "[EOS]"}
    if with_mask:
        kw["mask_token"] = "[MASK]"
    tok = char_tokenizer(specials, **kw)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, type_vocab_size=1,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    model = BertForMaskedLM(cfg).eval()
    path = tmp_path / name
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), model, tok


# ---------------------------------------------------------------- BERT-style masked LM
def test_bert_load_logits_text_helpers(tmp_path):
    path, raw, tok = bert_dir(tmp_path)
    m = MaskedDiffusionLM.from_pretrained(path)
    assert (m.mask_token_id, m.eos_token_id, m.pad_token_id) == (2, 3, 0)
    assert m.shift_logits is False and m.model_type == "bert"
    ids, att = m.pad_prompts(m.encode(["47+85=", "1+2="]))
    assert ids.tolist()[1][:2] == [0, 0] and att.tolist() == [[1] * 6, [0, 0, 1, 1, 1, 1]]
    x = torch.cat([ids, torch.full((2, 3), m.mask_token_id)], 1)
    a = torch.cat([att, torch.ones(2, 3, dtype=torch.long)], 1)
    got = m(x, a)
    assert got.dtype == torch.float32 and got.shape == (2, 9, len(tok))
    with torch.no_grad():
        torch.testing.assert_close(got, raw(input_ids=x, attention_mask=a).logits)
    eos = m.eos_token_id
    comp = torch.tensor([m.encode(["132"])[0] + [eos, eos], m.encode(["7"])[0] + [eos] + m.encode(["999"])[0]])
    assert m.decode(comp) == ["132", "7"]
    with pytest.raises(TypeError, match="list of strings"):
        m.encode("12")
    with pytest.raises(ValueError, match="attention_mask shape"):
        m(x, a[:, :3])


def test_full_save_round_trip(tmp_path):
    path, _, _ = bert_dir(tmp_path)
    m = MaskedDiffusionLM.from_pretrained(path)
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = str(tmp_path / "saved")
    m.save_pretrained(out)
    m2 = MaskedDiffusionLM.from_pretrained(out)
    x = torch.randint(4, 16, (3, 7))
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    assert m2.mask_token_id == m.mask_token_id
    with open(os.path.join(out, "flowalign_dllm.json")) as fh:
        assert json.load(fh)["shift_logits"] is False


def test_lora_reference_policy_and_adapter_round_trip(tmp_path):
    path, _, _ = bert_dir(tmp_path)
    base = MaskedDiffusionLM.from_pretrained(path)
    m = MaskedDiffusionLM.from_pretrained(path, lora_rank=4, lora_alpha=8.0)
    names = [n for n, p in m.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert len(m.trainable_parameters()) == len(names)
    assert not any("decoder" in t for t in default_lora_targets(base.model))
    with torch.no_grad():
        for n, p in m.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x = torch.randint(4, 16, (2, 6))
    assert not torch.allclose(m(x), base(x))
    with m.disable_adapter():
        torch.testing.assert_close(m(x), base(x))
    assert not torch.allclose(m(x), base(x))  # adapter back on
    out = str(tmp_path / "adapter")
    m.save_pretrained(out)
    assert os.path.isfile(os.path.join(out, "adapter_config.json"))
    assert not os.path.isfile(os.path.join(out, "model.safetensors"))
    m2 = MaskedDiffusionLM.from_pretrained(out)
    assert m2.has_lora and m2.trainable_parameters()
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    with m2.disable_adapter():
        torch.testing.assert_close(m2(x), base(x))
    # explicit targets
    only_q = MaskedDiffusionLM.from_pretrained(path, lora_rank=2, lora_target_modules=["query"])
    assert all(".query." in n for n, p in only_q.model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="lora_target_modules"):
        MaskedDiffusionLM.from_pretrained(path, lora_rank=2, lora_target_modules=["no_such_layer"])


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        MaskedDiffusionLM.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(OSError, match="no-such-org/no-such-model"):
        MaskedDiffusionLM.from_pretrained("no-such-org/no-such-model")
    path, _, _ = bert_dir(tmp_path, with_mask=False, name="nomask")
    with pytest.raises(ValueError, match="no mask token found for .*nomask"):
        MaskedDiffusionLM.from_pretrained(path)
    m = MaskedDiffusionLM.from_pretrained(path, mask_token_id=1)  # explicit override
    assert m.mask_token_id == 1
    with pytest.raises(RuntimeError, match="needs a LoRA model"), m.disable_adapter():
        pass
    with pytest.raises(ValueError, match="dtype='int7'"):
        MaskedDiffusionLM.from_pretrained(path, dtype="int7")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        MaskedDiffusionLM.from_pretrained(path, mask_token_id=10_000)


def test_known_mask_id_table():
    from transformers import PretrainedConfig

    tok = char_tokenizer(["[PAD]", "[UNK]", "[EOS]"], pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    assert MaskedDiffusionLM._find_mask_id(tok, PretrainedConfig(), "llada") == 126336
    assert MaskedDiffusionLM._find_mask_id(tok, PretrainedConfig(), "bert") is None
    assert MaskedDiffusionLM._find_mask_id(tok, PretrainedConfig(mask_token_id=7), "bert") == 7


# ---------------------------------------------------------------- trust_remote_code models
REMOTE_CONFIG = '''
from transformers import PretrainedConfig

class {cls}Config(PretrainedConfig):
    model_type = "{model_type}"

    def __init__(self, vocab_size=20, hidden=8, mask_token_id=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden = hidden
        if mask_token_id is not None:
            self.mask_token_id = mask_token_id
        super().__init__(**kwargs)
'''

REMOTE_MODEL = '''
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput
from .{cfg_module} import {cls}Config

class {cls}Model(PreTrainedModel):
    """A bidirectional toy: token + position embedding, masked mean over the sequence, linear head."""
    config_class = {cls}Config
    base_model_prefix = "toy"

    def __init__(self, config):
        super().__init__(config)
        self.emb = torch.nn.Embedding(config.vocab_size, config.hidden)
        self.pos = torch.nn.Embedding(64, config.hidden)
        self.proj = torch.nn.Linear(config.hidden, config.hidden)
        self.head = torch.nn.Linear(config.hidden, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(L).expand(B, L)
        h = self.emb(input_ids) + self.pos(position_ids)
        if attention_mask is None or isinstance(attention_mask, str):
            w = torch.ones(B, L, L)
        elif attention_mask.dim() == 4:
            w = attention_mask[:, 0].float()
        else:
            w = attention_mask[:, None, :].float().expand(B, L, L)
        ctx = (w @ h) / w.sum(-1, keepdim=True).clamp(min=1)
        return MaskedLMOutput(logits=self.head(torch.tanh(self.proj(h + ctx))))
'''


def remote_dir(tmp_path, name: str, model_type: str, *, config_mask_id: int | None, tok_specials, tok_kwargs):
    d = tmp_path / name
    d.mkdir()
    cls = name.replace("_", "").capitalize()
    (d / f"configuration_{name}.py").write_text(REMOTE_CONFIG.format(cls=cls, model_type=model_type))
    (d / f"modeling_{name}.py").write_text(REMOTE_MODEL.format(cls=cls, cfg_module=f"configuration_{name}"))
    tok = char_tokenizer(tok_specials, **tok_kwargs)
    cfg = {"model_type": model_type, "vocab_size": len(tok), "hidden": 8,
           "auto_map": {"AutoConfig": f"configuration_{name}.{cls}Config",
                        "AutoModel": f"modeling_{name}.{cls}Model"}}
    if config_mask_id is not None:
        cfg["mask_token_id"] = config_mask_id
    # build the weights with the module itself, then save them next to the code
    import importlib.util
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        spec_c = importlib.util.spec_from_file_location(f"{name}.configuration_{name}", d / f"configuration_{name}.py")
        (d / "__init__.py").write_text("")
        pkg = importlib.import_module(name)
        cmod = importlib.import_module(f"{name}.configuration_{name}")
        mmod = importlib.import_module(f"{name}.modeling_{name}")
        del spec_c, pkg
        config = getattr(cmod, f"{cls}Config")(vocab_size=len(tok), hidden=8, mask_token_id=config_mask_id)
        torch.manual_seed(1)
        model = getattr(mmod, f"{cls}Model")(config)
        model.save_pretrained(d)
    finally:
        sys.path.remove(str(tmp_path))
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]
    os.remove(d / "__init__.py")
    saved = json.loads((d / "config.json").read_text())
    saved.update(cfg)
    (d / "config.json").write_text(json.dumps(saved))
    tok.save_pretrained(d)
    return str(d), model


def test_llada_like_remote_code(tmp_path):
    path, raw = remote_dir(tmp_path, "llada_like", "llada", config_mask_id=None,
                           tok_specials=["<|pad|>", "<|unk|>", "<|eot|>", "<|mdm_mask|>"],
                           tok_kwargs={"pad_token": "<|pad|>", "unk_token": "<|unk|>", "eos_token": "<|eot|>"})
    with pytest.raises(OSError, match="trust_remote_code"):
        MaskedDiffusionLM.from_pretrained(path)
    m = MaskedDiffusionLM.from_pretrained(path, trust_remote_code=True)
    assert m.mask_token_id == 3 and m.eos_token_id == 2 and m.shift_logits is False
    x = torch.randint(4, 16, (2, 7))
    a = torch.ones_like(x)
    a[1, :2] = 0
    with torch.no_grad():
        torch.testing.assert_close(m(x, a), raw(input_ids=x, attention_mask=a).logits)
    # LoRA on a remote-code model, adapter round trip (trust_remote_code remembered)
    lm = MaskedDiffusionLM.from_pretrained(path, trust_remote_code=True, lora_rank=2)
    assert {n.split(".lora_")[0].split(".")[-1] for n, p in lm.model.named_parameters() if p.requires_grad} == {"proj"}
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    lm.save_pretrained(str(tmp_path / "llada_adapter"))
    lm2 = MaskedDiffusionLM.from_pretrained(str(tmp_path / "llada_adapter"))
    torch.testing.assert_close(lm2(x, a), lm(x, a))


def test_dream_like_remote_code_shift(tmp_path):
    path, raw = remote_dir(tmp_path, "dream_like", "Dream", config_mask_id=4,
                           tok_specials=["<|pad|>", "<|unk|>", "<|endoftext|>", "<|x|>", "<|y|>"],
                           tok_kwargs={"pad_token": "<|pad|>", "unk_token": "<|unk|>", "eos_token": "<|endoftext|>"})
    m = MaskedDiffusionLM.from_pretrained(path, trust_remote_code=True)
    assert m.mask_token_id == 4 and m.shift_logits is True and m.model_type == "Dream"
    x = torch.randint(5, 17, (2, 6))
    with torch.no_grad():
        r = raw(input_ids=x).logits
    got = m(x)
    # position i gets the raw prediction made at i-1; position 0 keeps raw position 0
    torch.testing.assert_close(got[:, 1:], r[:, :-1])
    torch.testing.assert_close(got[:, 0], r[:, 0])
    torch.testing.assert_close(got, shift_logits_right(r))
    # left padding: Dream's 4-D mask and cumulative position ids
    a = torch.ones_like(x)
    a[0, :2] = 0
    am = a.bool()
    pos = (a.cumsum(-1) - 1).masked_fill(a == 0, 1)
    with torch.no_grad():
        r2 = raw(input_ids=x, attention_mask=am[:, None, None, :] & am[:, None, :, None], position_ids=pos).logits
    torch.testing.assert_close(m(x, a), shift_logits_right(r2))
    # all-ones mask -> "full"
    torch.testing.assert_close(m(x, torch.ones_like(x)), got)
    # explicit override
    assert MaskedDiffusionLM.from_pretrained(path, trust_remote_code=True, shift_logits=False).shift_logits is False
    unshifted = MaskedDiffusionLM.from_pretrained(path, trust_remote_code=True, shift_logits=False)
    torch.testing.assert_close(unshifted(x), r)


# ---------------------------------------------------------------- masked-diffusion objective
class TableLM:
    """Analytic logits function: logits[i] = W[i, x_i-is-mask] + C * (number of masks) (context use)."""

    def __init__(self, L: int, V: int, mask_id: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(L, 2, V, generator=g)
        self.C = torch.randn(V, generator=g)
        self.mask_id = mask_id

    def __call__(self, ids, att=None):
        is_m = (ids == self.mask_id).long()
        return self.W[torch.arange(ids.shape[1])[None, :], is_m] + is_m.sum(1)[:, None, None] * self.C


def masked_nll_table(fn: TableLM, seq: torch.Tensor, P: int) -> dict[tuple[int, ...], float]:
    """For every mask pattern of the completion: sum_{masked i} -log p(x_i | x_t) (one sequence)."""
    Lg = seq.shape[0] - P
    out = {}
    for bits in itertools.product([0, 1], repeat=Lg):
        x = seq.clone()
        for j, b in enumerate(bits):
            if b:
                x[P + j] = fn.mask_id
        logp = torch.log_softmax(fn(x[None])[0], -1)
        out[bits] = -sum(logp[P + j, seq[P + j]].item() for j, b in enumerate(bits) if b)
    return out


def brute_force_loss_given_t(table: dict[tuple[int, ...], float], t: float) -> float:
    """sum over all 2^Lg masks of q(mask | t) * 1/(t Lg) * nll(mask): the exact expectation at t."""
    total = 0.0
    for bits, nll in table.items():
        Lg, k = len(bits), sum(bits)
        total += t ** k * (1 - t) ** (Lg - k) * nll / (t * Lg)
    return total


def test_masked_diffusion_loss_matches_enumeration():
    V, P, Lg, mask_id = 6, 2, 3, 5
    fn = TableLM(P + Lg, V, mask_id)
    seq = torch.tensor([0, 1, 2, 3, 4])
    # fixed t: Monte Carlo over masks vs exact enumeration
    n = 40_000
    g = torch.Generator().manual_seed(0)
    t = torch.full((n,), 0.4)
    per = masked_diffusion_loss(fn, seq.repeat(n, 1), None, P, mask_id, g, t=t, reduction="none")
    table = masked_nll_table(fn, seq, P)
    exact = brute_force_loss_given_t(table, 0.4)
    se = per.std().item() / math.sqrt(n)
    assert abs(per.mean().item() - exact) < 4 * se + 1e-6
    # t ~ U(eps, 1]: expectation = integral of the enumeration over t (midpoint rule, 400 nodes)
    eps = 1e-3
    nodes = [eps + (1 - eps) * (k + 0.5) / 400 for k in range(400)]
    exact_t = sum(brute_force_loss_given_t(table, s) for s in nodes) / len(nodes)
    per_t = masked_diffusion_loss(fn, seq.repeat(n, 1), None, P, mask_id, g, eps=eps, reduction="none")
    se_t = per_t.std().item() / math.sqrt(n)
    assert abs(per_t.mean().item() - exact_t) < 4 * se_t + 1e-4
    # explicit masks: prompt untouched, only masked positions counted
    masks = torch.tensor([[True, False, True]])
    got = masked_diffusion_loss(fn, seq[None], None, P, mask_id, t=torch.tensor([0.5]), masks=masks)
    x = seq.clone()
    x[[2, 4]] = mask_id
    logp = torch.log_softmax(fn(x[None])[0], -1)
    torch.testing.assert_close(got, -(logp[2, 2] + logp[4, 4]) / (0.5 * 3))


def test_mask_ratios_and_bad_args():
    t = sample_mask_ratios(1000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 1e-3 and t.max() <= 1.0
    # stratified: exactly one draw per 1/B bin
    assert sorted(((t - 1e-3) / (1 - 1e-3) * 1000).floor().long().tolist()) == list(range(1000))
    fn = TableLM(5, 6, 5)
    seq = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="prompt_length=5"):
        masked_diffusion_loss(fn, seq, None, 5, 5)
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\]"):
        masked_diffusion_loss(fn, seq, None, 2, 5, t=torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="masks must be"):
        masked_diffusion_loss(fn, seq, None, 2, 5, masks=torch.ones(2, 2, dtype=torch.bool))


def test_build_sequences_layout():
    seq, att, P = build_sequences([[7, 8], [9]], [[1], [2, 3]], gen_length=3, pad_id=0, eos_id=5)
    assert P == 2
    assert seq.tolist() == [[7, 8, 1, 5, 5], [0, 9, 2, 3, 5]]
    assert att.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="gen_length=1"):
        build_sequences([[1]], [[1, 2]], gen_length=1, pad_id=0, eos_id=5)


def test_pretrain_steps_reduce_the_loss(tmp_path):
    torch.manual_seed(0)
    path, _, _ = bert_dir(tmp_path)
    m = MaskedDiffusionLM.from_pretrained(path)
    pool = flawed_addition_pairs(16, rng=random.Random(0), low=0, high=9, digits=1)
    seq, att, P = examples_to_sequences(m, pool, gen_length=3)
    assert seq.shape == (16, 4 + 3)  # "3+4=" + 2 answer digits + EOS

    def fixed_loss() -> float:
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            return masked_diffusion_loss(m, seq.repeat(8, 1), att.repeat(8, 1), P, m.mask_token_id, g).item()

    before = fixed_loss()
    losses = pretrain_steps(m, pool, steps=40, batch_size=16, lr=3e-3, gen_length=3,
                            generator=torch.Generator().manual_seed(1))
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert fixed_loss() < 0.7 * before
    # LoRA: only adapter parameters move
    lm = MaskedDiffusionLM.from_pretrained(path, lora_rank=2)
    frozen = {n: p.clone() for n, p in lm.model.named_parameters() if not p.requires_grad}
    pretrain_steps(lm, lambda n: flawed_addition_pairs(n, rng=random.Random(2), low=0, high=9, digits=1),
                   steps=3, batch_size=4, lr=1e-2, gen_length=3, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(p, frozen[n]) for n, p in lm.model.named_parameters() if not p.requires_grad)


# ---------------------------------------------------------------- the shipped quickstart model
QUICKSTART = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "dllm_quickstart")


def test_shipped_quickstart_has_the_designed_flaw():
    from flowalign.dllm.pretrain import carry_count
    from flowalign.dllm.tasks import get_task

    m = MaskedDiffusionLM.from_pretrained(os.path.join(QUICKSTART, "model"))
    task = get_task("addition")
    train, evaluation = (task.load(os.path.join(QUICKSTART, f)) for f in ("train.jsonl", "eval.jsonl"))
    assert not {e.prompt for e in train} & {e.prompt for e in evaluation}
    assert all(e.reference == e.answer == f"{e.metadata['a'] + e.metadata['b']:04d}" for e in evaluation)
    with open(os.path.join(QUICKSTART, "metrics.json")) as fh:
        metrics = json.load(fh)
    # greedy low-confidence decoding, one token per step (written here independently of the script)
    ids, att = m.pad_prompts(m.encode([e.prompt for e in evaluation]))
    B, P, Lg = ids.shape[0], ids.shape[1], metrics["gen_length"]
    x = torch.cat([ids, torch.full((B, Lg), m.mask_token_id)], 1)
    a = torch.cat([att, torch.ones(B, Lg, dtype=torch.long)], 1)
    banned = [i for i in m.tokenizer.all_special_ids if i != m.eos_token_id]
    with torch.no_grad():
        for _ in range(Lg):
            probs = m(x, a)[:, P:].index_fill(-1, torch.tensor(banned), -math.inf).softmax(-1)
            conf, tok = probs.max(-1)
            conf = conf.masked_fill(x[:, P:] != m.mask_token_id, -1.0)
            pos = conf.argmax(-1)
            x[torch.arange(B), P + pos] = tok[torch.arange(B), pos]
    rewards = [task.reward(t, e) for t, e in zip(m.decode(x[:, P:]), evaluation)]
    acc = sum(rewards) / B
    assert acc == pytest.approx(metrics["base_eval"]["accuracy"], abs=0.011)
    assert 0.35 <= acc <= 0.6
    by = {}
    for r, e in zip(rewards, evaluation):
        by.setdefault(min(carry_count(e.metadata["a"], e.metadata["b"]), 2), []).append(r)
    assert sum(by[0]) / len(by[0]) > 0.95  # carry-free sums are right
    assert sum(by[2]) / len(by[2]) < 0.2  # two or more carries: dropped
