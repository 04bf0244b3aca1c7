"""GenEval-style compositional checks with an open-vocabulary detector (OWLv2).

GenEval (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
Alignment", reference code ``djghosh13/geneval``, ``evaluation/evaluate_images.py``) detects the
prompt's objects (Mask2Former), then checks, per ``include`` requirement of the prompt's JSONL
metadata, the object count, the colour (CLIP zero-shot over a fixed colour list) and the position
relative to an earlier requirement's objects (box geometry), and per ``exclude`` requirement that
fewer than ``count`` objects are present. Here transformers' ``Owlv2ForObjectDetection`` is the
detector and also the colour classifier: a detected box's class embedding is scored against the
queries ``"a photo of a {colour} {class}"`` (OWLv2's box embeddings live in CLIP's text space, the
role CLIP ViT-L/14 plays on GenEval's crops). GenEval's binary "correct" is kept as the ``strict``
component; the training score is the fraction of requirements satisfied (partial credit, denser
than the binary metric, in the spirit of Flow-GRPO's GenEval reward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ._media import check_media, to_pil_images
from .base import RewardOutput

__all__ = ["Detection", "GenEvalReward", "relative_position", "nms", "evaluate_requirements", "COLORS"]

# evaluate_images.py: COLORS; POSITION_THRESHOLD = 0.1; MAX_OBJECTS = 16.
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
POSITION_THRESHOLD = 0.1
MAX_OBJECTS = 16
CHECKS = ("count", "color", "position", "exclude")


@dataclass(frozen=True)
class Detection:
    """One detected object: ``box`` (x0, y0, x1, y1) in pixels, ``score`` in [0, 1], predicted ``color``."""

    box: tuple[float, float, float, float]
    score: float
    color: str | None = None


def relative_position(a: Detection, b: Detection, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """GenEval ``relative_position``: where ``a`` is relative to ``b`` (subset of left of/right of/above/below).

    Centre offset shrunk by ``threshold · (size_a + size_b)`` per axis; a relation holds when the
    unit-normalised shrunk offset exceeds 0.5 along it (image y grows downwards).
    """
    ca = torch.tensor([(a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2], dtype=torch.float64)
    cb = torch.tensor([(b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2], dtype=torch.float64)
    dim_a = torch.tensor([a.box[2] - a.box[0], a.box[3] - a.box[1]], dtype=torch.float64).abs()
    dim_b = torch.tensor([b.box[2] - b.box[0], b.box[3] - b.box[1]], dtype=torch.float64).abs()
    offset = ca - cb
    revised = (offset.abs() - threshold * (dim_a + dim_b)).clamp(min=0) * offset.sign()
    if bool((revised.abs() < 1e-3).all()):
        return set()
    dx, dy = (revised / offset.norm()).tolist()
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression; ``boxes [N, 4]`` xyxy, ``scores [N]`` -> kept indices by score desc.

    OWLv2 predicts one box per image patch, so several patches fire on one object; unlike GenEval's
    set-prediction Mask2Former (whose NMS threshold is 1.0, i.e. off) counting needs NMS here.
    """
    order = scores.argsort(descending=True)
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    keep: list[int] = []
    for i in order.tolist():
        if keep:
            k = torch.tensor(keep)
            lt = torch.maximum(boxes[k, :2], boxes[i, :2])
            rb = torch.minimum(boxes[k, 2:], boxes[i, 2:])
            inter = (rb - lt).clamp(min=0).prod(-1)
            iou = inter / (area[k] + area[i] - inter).clamp(min=1e-9)
            if bool((iou > iou_threshold).any()):
                continue
        keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def _check_metadata(meta: Any, index: int) -> None:
    if not isinstance(meta, dict) or not isinstance(meta.get("include"), list):
        raise ValueError(f"GenEvalReward: metadata[{index}] must be a GenEval JSONL record with an 'include' list "
                         f"(e.g. {{'tag': 'counting', 'include': [{{'class': 'dog', 'count': 2}}]}}), got {meta!r}")
    for key in ("include", "exclude"):
        for j, req in enumerate(meta.get(key, [])):
            if not isinstance(req, dict) or not isinstance(req.get("class"), str) or "count" not in req:
                raise ValueError(f"GenEvalReward: metadata[{index}][{key!r}][{j}] needs 'class' and 'count', got {req!r}")
            if "color" in req and req["color"] not in COLORS:
                raise ValueError(f"GenEvalReward: metadata[{index}][{key!r}][{j}] colour {req['color']!r} not in {COLORS}")


def evaluate_requirements(objects: dict[str, list[Detection]], meta: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """GenEval ``evaluate`` per check: ``{check: (satisfied, total)}`` for count / color / position / exclude.

    ``objects``: class -> detections sorted by score (desc). Mirrors evaluate_images.py: the first
    ``count`` detections of an include class are its group; colour needs ``count`` of them with the
    colour; position needs every group object in the relation to every object of the target group;
    a failed count fails the colour / position checks of that requirement.
    """
    tally = {c: [0, 0] for c in CHECKS}
    groups: list[list[Detection] | None] = []
    for req in meta.get("include", []):
        found = objects.get(req["class"], [])[: req["count"]]
        matched = len(found) >= req["count"]
        tally["count"][0] += matched
        tally["count"][1] += 1
        if "color" in req:
            ok = matched and sum(d.color == req["color"] for d in found) >= req["count"]
            matched &= ok
            tally["color"][0] += ok
            tally["color"][1] += 1
        if "position" in req:
            relation, target = req["position"]
            ok = matched and target < len(groups) and groups[target] is not None and all(
                relation in relative_position(d, t) for d in found for t in groups[target])
            matched &= ok
            tally["position"][0] += ok
            tally["position"][1] += 1
        groups.append(found if matched else None)
    for req in meta.get("exclude", []):
        tally["exclude"][0] += len(objects.get(req["class"], [])) < req["count"]
        tally["exclude"][1] += 1
    return {c: (s, t) for c, (s, t) in tally.items()}


class GenEvalReward:
    """Fraction of a prompt's GenEval requirements an image satisfies, detected with OWLv2.

    ``__call__(media [B, 3, H, W], prompts, metadata)``: ``metadata[i]`` is the prompt's GenEval
    record (``tag``, ``include``, optional ``exclude``). Returns scores ``[B]`` in [0, 1] and
    components ``strict`` (GenEval's all-correct 0/1) and ``count`` / ``color`` / ``position`` /
    ``exclude`` (fraction of that kind satisfied; 1.0 when the prompt has none).

    Args:
        path: OWLv2 checkpoint (hub id or directory with model + processor files).
        threshold / counting_threshold: detection score thresholds (GenEval uses 0.3 / 0.9 for
            Mask2Former's scores; OWLv2 scores are lower, hence the defaults 0.2 / 0.3).
        nms_iou: IoU above which a lower-scoring box of the same class is suppressed.
    """

    name = "geneval"
    modality = "image"

    def __init__(self, path: str = "google/owlv2-base-patch16-ensemble", device: str = "cpu",
                 threshold: float = 0.2, counting_threshold: float = 0.3, nms_iou: float = 0.3) -> None:
        from transformers import AutoProcessor, Owlv2ForObjectDetection

        for arg, v in (("threshold", threshold), ("counting_threshold", counting_threshold), ("nms_iou", nms_iou)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"GenEvalReward: {arg} must be in [0, 1], got {v!r}")
        self.device, self.path = torch.device(device), path
        self.threshold, self.counting_threshold, self.nms_iou = float(threshold), float(counting_threshold), float(nms_iou)
        self.model = Owlv2ForObjectDetection.from_pretrained(path).to(self.device).eval().requires_grad_(False)
        processor = AutoProcessor.from_pretrained(path)
        self.image_processor, self.tokenizer = processor.image_processor, processor.tokenizer
        self.max_length = self.model.config.text_config.max_position_embeddings
        if len(self.tokenizer) != self.model.config.text_config.vocab_size:
            raise ValueError(f"GenEvalReward: tokenizer at {path!r} has {len(self.tokenizer)} tokens, the model embeds "
                             f"{self.model.config.text_config.vocab_size} (empty or wrong vocabulary)")

    @staticmethod
    def _queries(meta: dict[str, Any]) -> tuple[list[str], list[str], dict[str, int]]:
        """(query texts, detection classes, class -> offset of its colour queries)."""
        classes = list(dict.fromkeys(r["class"] for k in ("include", "exclude") for r in meta.get(k, [])))
        queries = [f"a photo of a {c}" for c in classes]
        color_at: dict[str, int] = {}
        for c in dict.fromkeys(r["class"] for r in meta["include"] if "color" in r):
            color_at[c] = len(queries)
            queries += [f"a photo of a {col} {c}" for col in COLORS]
        return queries, classes, color_at

    @torch.no_grad()
    def detect(self, media: Tensor, metadata: Sequence[dict[str, Any]]) -> list[dict[str, list[Detection]]]:
        """Per image: class -> detections (score desc, after NMS, at most 16), boxes in pixels."""
        images = to_pil_images(media)
        plans = [self._queries(m) for m in metadata]
        q_max = max(len(p[0]) for p in plans)
        texts = [q for p in plans for q in p[0] + [""] * (q_max - len(p[0]))]
        tok = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").to(self.device)
        pixels = self.image_processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        out = self.model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixels)
        logits, boxes = out.logits.float().cpu(), out.pred_boxes.float().cpu()  # [B, P, Q], [B, P, 4] (cx, cy, w, h)
        results = []
        for i, ((_, classes, color_at), meta) in enumerate(zip(plans, metadata)):
            side = float(max(images[i].size))  # OWLv2 pads bottom/right to a square before resizing
            xyxy = torch.cat([boxes[i, :, :2] - boxes[i, :, 2:] / 2, boxes[i, :, :2] + boxes[i, :, 2:] / 2], -1) * side
            best, label = logits[i, :, : len(classes)].max(-1)
            score = best.sigmoid()
            thr = self.counting_threshold if meta.get("tag") == "counting" else self.threshold
            objects: dict[str, list[Detection]] = {}
            for c, name in enumerate(classes):
                idx = ((label == c) & (score > thr)).nonzero().flatten()
                idx = idx[nms(xyxy[idx], score[idx], self.nms_iou)][:MAX_OBJECTS] if len(idx) else idx
                dets = []
                for p in idx.tolist():
                    color = None
                    if name in color_at:
                        color = COLORS[int(logits[i, p, color_at[name]: color_at[name] + len(COLORS)].argmax())]
                    dets.append(Detection(tuple(xyxy[p].tolist()), float(score[p]), color))
                objects[name] = dets
            results.append(objects)
        return results

    def __call__(self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                 ) -> RewardOutput:
        """Score ``B`` images against their GenEval records; scores ``[B]`` on ``media``'s device."""
        media = check_media(media, "image")
        if metadata is None or len(metadata) != media.shape[0]:
            raise ValueError(f"GenEvalReward needs metadata: one GenEval record per image ({media.shape[0]}), got "
                             f"{None if metadata is None else len(metadata)}")
        for i, m in enumerate(metadata):
            _check_metadata(m, i)
        rows = [evaluate_requirements(objs, m) for objs, m in zip(self.detect(media, metadata), metadata)]
        sat = torch.tensor([[r[c][0] for c in CHECKS] for r in rows], dtype=torch.float32)
        tot = torch.tensor([[r[c][1] for c in CHECKS] for r in rows], dtype=torch.float32)
        frac = torch.where(tot > 0, sat / tot.clamp(min=1), torch.ones_like(sat))
        scores = sat.sum(1) / tot.sum(1).clamp(min=1)
        comps = {c: frac[:, k] for k, c in enumerate(CHECKS)} | {"strict": (sat == tot).all(1).float()}
        dev = media.device
        return RewardOutput(scores=scores.to(dev), components={k: v.to(dev) for k, v in comps.items()})

    @classmethod
    def tiny(cls, tmp_dir: str, seed: int = 0, **kwargs: Any) -> "GenEvalReward":
        """Tests only: a random tiny OWLv2 + CLIP BPE tokenizer saved in the hub layout, loaded back."""
        from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

        from .clip_models import write_tiny_tokenizer

        n = write_tiny_tokenizer(tmp_dir)
        text = dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=16, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=0)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                      patch_size=16)
        torch.manual_seed(seed)
        Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(tmp_dir)
        Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}),
                       tokenizer=CLIPTokenizer.from_pretrained(tmp_dir, model_max_length=16)).save_pretrained(tmp_dir)
        return cls(tmp_dir, **kwargs)
