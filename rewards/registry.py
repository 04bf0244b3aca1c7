"""Find and build rewards by name (docs/ARCHITECTURE.md, "Rewards": registry).

A reward is named in three ways, tried in this order:

1. a built-in name from :data:`BUILTIN_REWARDS` (a static table of dotted paths; nothing is
   imported until the reward is asked for);
2. an entry point in the ``flowalign.rewards`` group declared by an installed distribution;
3. a ``package.module:Class`` or ``package.module.Class`` path.

This module imports only the standard library, so listing rewards is cheap; torch loads when a
reward is built.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .base import Reward
    from .weighted import WeightedSum

__all__ = [
    "RewardInfo",
    "BUILTIN_REWARDS",
    "ENTRY_POINT_GROUP",
    "resolve_reward_class",
    "build_reward",
    "build_rewards",
    "list_rewards",
]

ENTRY_POINT_GROUP = "flowalign.rewards"

#: Keys of a dict spec that are not constructor arguments.
COMPONENT_KEY = "_component_"
_RESERVED_KEYS = (COMPONENT_KEY, "weight", "name")


@dataclass(frozen=True)
class RewardInfo:
    """One row of the built-in reward table.

    Attributes:
        path: ``"package.module:Class"`` of the reward class.
        modality: ``"image"``, ``"video"`` or ``"text"``.
        extra: the pip extra it needs (``pip install flowalign[extra]``), or ``""``.
        weights: where its weights come from, in words.
    """

    path: str
    modality: str
    extra: str = ""
    weights: str = ""


BUILTIN_REWARDS: dict[str, RewardInfo] = {
    "digit_classifier": RewardInfo(
        path="flowalign.rewards.digits:DigitClassifierReward",
        modality="image",
        weights="repo-trained CNN checkpoint: assets/quickstart/digit-classifier",
    ),
    "digit_judge": RewardInfo(
        path="flowalign.rewards.digits:DigitJudge",
        modality="image",
        weights="none: a scikit-learn classifier fitted at load",
    ),
    "jpeg_compressibility": RewardInfo(
        path="flowalign.rewards.jpeg:JpegCompressibility",
        modality="image",
        weights="none: JPEG file size (DDPO)",
    ),
    "jpeg_incompressibility": RewardInfo(
        path="flowalign.rewards.jpeg:JpegIncompressibility",
        modality="image",
        weights="none: JPEG file size (DDPO)",
    ),
    "source_ssim": RewardInfo(path="flowalign.rewards.source_similarity:SourceSSIM", modality="image",
                              weights="none: SSIM of the edit and its source image (editing models; needs \"image\" per prompt)"),
    "pickscore": RewardInfo(path="flowalign.rewards.pickscore:PickScore", modality="image",
                            weights="hub: yuvalkirstain/PickScore_v1 (+ processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"),
    "clip_score": RewardInfo(path="flowalign.rewards.clip_score:ClipScore", modality="image",
                             weights="hub: openai/clip-vit-large-patch14 (any transformers CLIPModel)"),
    "laion_aesthetic": RewardInfo(path="flowalign.rewards.aesthetic:LaionAesthetic", modality="image",
                                  weights="hub: trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth + openai/clip-vit-large-patch14"),
    "hpsv2": RewardInfo(path="flowalign.rewards.hps:HPSv2", modality="image",
                        weights="hub: xswu/HPSv2/HPS_v2_compressed.pt (open_clip layout, key-mapped)"),
    "hpsv21": RewardInfo(path="flowalign.rewards.hps:HPSv21", modality="image",
                         weights="hub: xswu/HPSv2/HPS_v2.1_compressed.pt (open_clip layout, key-mapped)"),
    "image_reward": RewardInfo(path="flowalign.rewards.image_reward:ImageReward", modality="image",
                               weights="hub: THUDM/ImageReward (ImageReward.pt, BLIP key map) + bert-base-uncased tokenizer"),
    "geneval": RewardInfo(path="flowalign.rewards.geneval:GenEvalReward", modality="image",
                          weights="hub: google/owlv2-base-patch16-ensemble (needs GenEval metadata per prompt)"),
    "groupwise_rank": RewardInfo(path="flowalign.rewards.groupwise:GroupwiseRank", modality="image",
                                 weights="none: wraps the reward given as `reward:`"),
    "group_diversity": RewardInfo(path="flowalign.rewards.groupwise:GroupDiversity", modality="image",
                                  weights="none: pixels, or the embed() of the reward given as `features:`"),
    "pairwise_winrate": RewardInfo(path="flowalign.rewards.groupwise:PairwiseAsPointwise", modality="image",
                                   weights="none: wraps a pairwise judge, e.g. flowalign.rewards.vlm_judge:VLMJudge"),
    "ocr": RewardInfo(path="flowalign.rewards.ocr:OcrReward", modality="image", extra="ocr",
                      weights="pip wheel: PP-OCRv4 det + rec ONNX shipped in rapidocr-onnxruntime (no download); "
                              "backend='tesseract' needs apt-get install -y tesseract-ocr"),
    "video_frames": RewardInfo(path="flowalign.rewards.video:FrameAggregatedReward", modality="video",
                               weights="those of the wrapped image reward"),
    "temporal_consistency": RewardInfo(path="flowalign.rewards.video:TemporalConsistencyReward", modality="video",
                                       weights="hub: openai/clip-vit-base-patch32 (any CLIP checkpoint)"),
    "videoalign": RewardInfo(path="flowalign.rewards.remote:VideoAlignReward", modality="video",
                             weights="remote: a VideoAlign server started with `flowalign serve-reward`"),
}


def _unknown(name: str, why: str = "") -> ValueError:
    return ValueError(
        f"unknown reward {name!r}{why}; built-in rewards: {sorted(BUILTIN_REWARDS)}; or install a package with a "
        f"{ENTRY_POINT_GROUP!r} entry point, or give a 'package.module:Class' / 'package.module.Class' path"
    )


def _import_path(path: str, name: str) -> Any:
    """Import ``package.module:attr.sub`` or ``package.module.attr``; ``name`` is used in errors."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise _unknown(name)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise _unknown(name, f" (no module {module_name!r})") from err
        raise ImportError(f"reward {name!r}: importing {module_name!r} failed: {err}") from err
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as err:
            raise _unknown(name, f" (module {module_name!r} has no attribute {attr!r})") from err
    return obj


def _entry_point(name: str) -> importlib.metadata.EntryPoint | None:
    """The entry point called ``name`` in :data:`ENTRY_POINT_GROUP`, or ``None``."""
    found = {ep.value: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name)}
    if len(found) > 1:
        raise ValueError(f"reward {name!r} is declared by several {ENTRY_POINT_GROUP!r} entry points: {sorted(found)}")
    return next(iter(found.values()), None)


def resolve_reward_class(name: str) -> type | Callable[..., Any]:
    """Resolve a reward name to its class (or factory function), importing it.

    Args:
        name: a built-in name, an entry-point name in group ``"flowalign.rewards"``, or a
            ``"package.module:Class"`` / ``"package.module.Class"`` path.

    Returns:
        The class or callable the name points to.

    Raises:
        ValueError: unknown name (the message lists the built-in names).
        ImportError: the reward's module exists but fails to import (e.g. a missing extra).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"reward name must be a non-empty string, got {name!r}; built-in rewards: {sorted(BUILTIN_REWARDS)}")
    name = name.strip()
    info = BUILTIN_REWARDS.get(name)
    if info is not None:
        try:
            obj = _import_path(info.path, name)
        except ImportError as err:
            hint = f"; install it with `pip install flowalign[{info.extra}]`" if info.extra else ""
            raise ImportError(f"built-in reward {name!r} ({info.path}) could not be imported: {err}{hint}") from err
    else:
        ep = _entry_point(name)
        if ep is not None:
            try:
                obj = ep.load()
            except Exception as err:  # a broken plugin: say which one
                raise ImportError(f"reward {name!r}: loading entry point {ep.value!r} ({ENTRY_POINT_GROUP}) failed: {err}") from err
        elif ":" in name or "." in name:
            obj = _import_path(name, name)
        else:
            raise _unknown(name)
    if not callable(obj):
        raise ValueError(f"reward {name!r} resolved to a {type(obj).__name__}, which is not a class or callable")
    return obj


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dict / list (other values unchanged)."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def _is_score_function(fn: Callable[..., Any]) -> bool:
    """True if ``fn`` looks like ``fn(media, prompts, metadata)`` rather than a zero-arg factory."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    try:
        signature.bind()
        return False  # callable without arguments: a factory
    except TypeError:
        pass
    try:
        signature.bind(None, None, None)
        return True
    except TypeError:
        return False


def _is_prebuilt(spec: Any) -> bool:
    """True if ``spec`` (or its ``_component_``) is an existing Reward object, which is never mutated."""
    from .base import Reward

    if isinstance(spec, Mapping):
        spec = spec.get(COMPONENT_KEY)
    return not isinstance(spec, type) and isinstance(spec, Reward)


def _set_name(reward: Any, name: str) -> Any:
    try:
        reward.name = name
    except AttributeError as err:
        raise ValueError(f"cannot rename reward {type(reward).__name__} to {name!r}: its name is read-only") from err
    return reward


def _from_resolved(obj: Any, kwargs: dict[str, Any], label: str) -> "Reward":
    """Instantiate a resolved class / factory, or wrap a resolved score function."""
    from .base import Reward
    from .callable import CallableReward

    if not isinstance(obj, type) and not kwargs and _is_score_function(obj):
        return CallableReward(obj)
    try:
        built = obj(**kwargs)
    except TypeError as err:
        raise TypeError(f"building reward {label!r} with arguments {sorted(kwargs)} failed: {err}") from err
    if isinstance(built, Reward):
        return built
    if callable(built) and not isinstance(obj, type):
        return CallableReward(built)  # a factory that returned a plain score function
    raise TypeError(
        f"reward {label!r} built a {type(built).__name__}, which does not satisfy the Reward protocol "
        "(name, modality, __call__(media, prompts, metadata) -> RewardOutput)"
    )


def build_reward(spec: Any, **kwargs: Any) -> "Reward":
    """Build one reward.

    Args:
        spec: one of
            * a name or path string (see :func:`resolve_reward_class`); ``kwargs`` go to the class;
            * a dict ``{"_component_": name, **kwargs}`` (OmegaConf ``DictConfig`` too); a
              ``"weight"`` key is ignored here (:func:`build_rewards` uses it) and ``"name"``
              renames the built reward; ``kwargs`` override the dict's entries;
            * a class (instantiated with ``kwargs``);
            * an object satisfying the :class:`Reward` protocol (returned as is);
            * a plain callable ``fn(media, prompts, metadata) -> Tensor | list[float] |
              RewardOutput`` (wrapped in :class:`CallableReward`; ``kwargs`` go to it, e.g.
              ``name=``, ``modality=``).
        A resolved name that is a function rather than a class is a score function if it takes
        ``(media, prompts, metadata)`` and no ``kwargs`` were given, else a factory called with them.

    Returns:
        A :class:`Reward`.
    """
    from .base import Reward
    from .callable import CallableReward

    spec = _plain(spec)
    if isinstance(spec, str):
        return _from_resolved(resolve_reward_class(spec), kwargs, spec)
    if isinstance(spec, Mapping):
        params = {**spec, **kwargs}
        if COMPONENT_KEY not in params:
            raise ValueError(f"reward spec is missing the {COMPONENT_KEY!r} key (the reward's name or path); got keys {sorted(params)}")
        component = params.pop(COMPONENT_KEY)
        params.pop("weight", None)
        rename = params.pop("name", None)
        if isinstance(component, str):
            reward = _from_resolved(resolve_reward_class(component), params, component)
        else:
            reward = build_reward(component, **params)
        if rename is None or reward.name == rename:
            return reward
        if _is_prebuilt(component):
            raise ValueError(
                f"cannot rename the already-built reward {reward.name!r} to {rename!r} (it may be shared); "
                "build_rewards uses 'name' as its key without renaming"
            )
        return _set_name(reward, str(rename))
    if isinstance(spec, type):
        return _from_resolved(spec, kwargs, spec.__name__)
    if isinstance(spec, Reward):
        if kwargs:
            raise ValueError(f"build_reward: got arguments {sorted(kwargs)} for an already-built reward {spec.name!r}")
        return spec
    if callable(spec):
        return CallableReward(spec, **kwargs)
    raise TypeError(
        f"build_reward: spec must be a name/path string, a dict with {COMPONENT_KEY!r}, a Reward or a callable; "
        f"got {type(spec).__name__}"
    )


def _finite_weight(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"weight of reward {name!r} must be a finite number, got {value!r}")
    return float(value)


def build_rewards(specs: Sequence[Any] | Mapping[str, Any]) -> "WeightedSum":
    """Build a weighted sum of rewards.

    Args:
        specs: either a list of specs (anything :func:`build_reward` takes; dict specs may carry
            ``"weight"`` (default 1.0) and ``"name"``, which overrides the reward's name), or a
            dict ``name -> spec`` (the key is the name; a dict spec may carry ``"weight"``).

    Returns:
        :class:`WeightedSum` keyed by reward name.

    Raises:
        ValueError: empty specs, a duplicate name (named), or a non-finite weight.
    """
    from .weighted import WeightedSum

    specs = _plain(specs)
    if isinstance(specs, Mapping):
        items: list[tuple[str | None, Any]] = []
        for key, spec in specs.items():
            spec = _plain(spec)
            if isinstance(spec, Mapping) and "name" in spec and spec["name"] != key:
                raise ValueError(f"reward {key!r} has a conflicting 'name': {spec['name']!r}")
            items.append((str(key), spec))
    elif isinstance(specs, Sequence) and not isinstance(specs, (str, bytes)):
        items = [(None, _plain(spec)) for spec in specs]
    else:
        raise TypeError(f"build_rewards: specs must be a list of reward specs or a dict name -> spec, got {type(specs).__name__}")
    if not items:
        raise ValueError("build_rewards: no rewards given")

    rewards: dict[str, Reward] = {}
    weights: dict[str, float] = {}
    for key, spec in items:
        weight: Any = 1.0
        name = key
        if isinstance(spec, Mapping):
            spec = dict(spec)
            weight = spec.pop("weight", 1.0)
            given = spec.pop("name", None)
            name = key if key is not None else (None if given is None else str(given))
        reward = build_reward(spec)
        if name is None:
            name = reward.name
        elif reward.name != name and not _is_prebuilt(spec):
            reward = _set_name(reward, name)  # freshly built: safe to rename; shared objects are only keyed
        if name in rewards:
            raise ValueError(f"build_rewards: duplicate reward name {name!r}; give one of them a different 'name'")
        rewards[name] = reward
        weights[name] = _finite_weight(weight, name)
    return WeightedSum(rewards, weights)


def list_rewards(include_entry_points: bool = True) -> list[dict[str, str]]:
    """Describe the rewards that can be named, for ``flowalign ls rewards``.

    Returns:
        One dict per reward with keys ``name, path, modality, extra, weights, source``
        (``source``: ``"builtin"`` or ``"entry point (<distribution>)"``). Entry-point rewards are
        not imported, so their ``modality`` / ``weights`` are ``""``.
    """
    rows = [
        {"name": name, "path": info.path, "modality": info.modality, "extra": info.extra, "weights": info.weights,
         "source": "builtin"}
        for name, info in BUILTIN_REWARDS.items()
    ]
    if include_entry_points:
        seen = set(BUILTIN_REWARDS)  # built-ins win resolution; a dist found twice on sys.path lists once
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if ep.name in seen:
                continue
            seen.add(ep.name)
            dist = getattr(ep, "dist", None)
            origin = f"entry point ({dist.name})" if dist is not None else "entry point"
            rows.append({"name": ep.name, "path": ep.value, "modality": "", "extra": "", "weights": "", "source": origin})
    return rows
