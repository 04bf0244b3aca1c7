"""The algorithm registry: every published method is one class, registered under its name.

An algorithm declares (as class attributes) its ``name``, a one-line ``summary``, its ``paper``,
the ``recipe`` loop it runs in (``rl``: policy gradient on sampled transitions; ``awm``:
advantage-weighted flow matching; ``dllm``: masked-diffusion LMs) and ``Config``, the dataclass of
its own fields, which the config schema mounts at ``algorithm.<name>``. The recipe family's base
class (:class:`flowalign.algorithms.flow.FlowAlgorithm`, :class:`flowalign.algorithms.dllm.DLLMAlgorithm`)
defines the hooks a loop calls; a method overrides the ones it changes.

This is verl's ``register_adv_est`` pattern (``verl/trainer/ppo/core_algos.py``) applied to whole
algorithms: :func:`register_algorithm` is a class decorator, :func:`get_algorithm` looks a name up
and fails with a "did you mean". The package imports every module in it, so a new algorithm is one
new file (plus its config and tests): nothing else lists algorithms.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass, make_dataclass
from typing import Any, ClassVar

from flowalign.config_fields import _f

__all__ = ["ALGORITHMS", "Algorithm", "algorithm_config_class", "algorithm_names", "get_algorithm", "register_algorithm"]

#: the recipe loops an algorithm can run in.
RECIPE_LOOPS = ("rl", "awm", "dllm")


class Algorithm:
    """What every registered algorithm declares.

    Class attributes:
        name: the ``algorithm.name`` value (also the key of its own config node).
        summary: one line for ``flowalign ls algorithms``.
        paper: the citation (authors, year, arXiv id).
        recipe: the loop it runs in: ``rl`` | ``awm`` | ``dllm``.
        Config: a dataclass of the algorithm's own fields (each made with ``_f``, documented), or
            ``None`` when it has none.
        config_file: the shipped config that runs it on the quickstart data (``flowalign ls algorithms``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    recipe: ClassVar[str] = ""
    Config: ClassVar[type | None] = None
    config_file: ClassVar[str] = ""

    def __init__(self, cfg: Any):
        """An instance runs one config: ``cfg`` and its own node ``opts`` (``None`` without a ``Config``)."""
        self.cfg = cfg
        self.opts = self.options(cfg)

    @classmethod
    def check(cls, cfg: Any, world_size: int) -> None:
        """Semantic checks of a config that runs this algorithm; raise ``ConfigError`` naming the key."""

    @classmethod
    def options(cls, cfg: Any) -> Any:
        """This algorithm's own config node, ``cfg.algorithm.<name>`` (``None`` without a ``Config``)."""
        return getattr(cfg.algorithm, cls.name, None) if cls.Config is not None else None


#: name -> algorithm class, in registration order.
ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: add ``cls`` to :data:`ALGORITHMS` under ``cls.name``.

    Raises:
        ValueError: the name is missing, taken, or not an identifier; ``recipe`` is unknown; or
            ``Config`` is not a dataclass whose fields all have defaults.
    """
    name = cls.name
    if not name or not name.isidentifier():
        raise ValueError(f"{cls.__qualname__}.name must be an identifier, got {name!r}")
    if name in ALGORITHMS and ALGORITHMS[name] is not cls:
        raise ValueError(f"algorithm {name!r} is registered twice: {ALGORITHMS[name].__qualname__} and {cls.__qualname__}")
    if cls.recipe not in RECIPE_LOOPS:
        raise ValueError(f"{cls.__qualname__}.recipe must be one of {RECIPE_LOOPS}, got {cls.recipe!r}")
    if not cls.summary or not cls.paper:
        raise ValueError(f"{cls.__qualname__} needs a one-line summary and a paper")
    if cls.Config is not None:
        if not is_dataclass(cls.Config):
            raise ValueError(f"{cls.__qualname__}.Config must be a dataclass")
        cls.Config()  # every field has a default
    ALGORITHMS[name] = cls
    return cls


def algorithm_names(recipes: tuple[str, ...] = RECIPE_LOOPS) -> list[str]:
    """The names of the algorithms that run in one of ``recipes``, in registration order."""
    return [name for name, cls in ALGORITHMS.items() if cls.recipe in recipes]


def get_algorithm(name: str, recipes: tuple[str, ...] = RECIPE_LOOPS, key: str = "algorithm.name") -> type[Algorithm]:
    """The algorithm class registered as ``name`` among those of ``recipes``.

    Raises:
        ConfigError: unknown name (with a "did you mean"), or one that runs in another recipe.
    """
    from flowalign.config_checks import _did_you_mean
    from flowalign.errors import ConfigError

    names = algorithm_names(recipes)
    if name in names:
        return ALGORITHMS[name]
    if name in ALGORITHMS:
        other = ALGORITHMS[name].recipe
        raise ConfigError(f"{key}: {name!r} runs in the {other!r} recipe, not in {' | '.join(recipes)}; set recipe: {other} "
                          f"(or leave recipe out: it follows algorithm.name)")
    raise ConfigError(f"{key}: unknown algorithm {name!r}{_did_you_mean(name, names)}; choose from {' | '.join(names)} "
                      "(`flowalign ls algorithms`)")


def algorithm_config_class(cls_name: str, base: type, recipes: tuple[str, ...]) -> type:
    """The ``algorithm`` section of a schema: ``base`` (the fields every algorithm of these recipes
    shares) plus one field per algorithm with a ``Config``, named after it and holding its node."""
    own = [(name, ALGORITHMS[name].Config, _f(factory=ALGORITHMS[name].Config,
                                                help=f"{name} only: {ALGORITHMS[name].summary}"))
           for name in algorithm_names(recipes) if ALGORITHMS[name].Config is not None]
    taken = {f.name for f in fields(base)} & {name for name, _, _ in own}
    if taken:
        raise ValueError(f"algorithm names {sorted(taken)} clash with shared fields of {base.__name__}")
    doc = (base.__doc__ or "").rstrip() + "\n\nPer-algorithm nodes: " + ", ".join(name for name, _, _ in own) + "."
    return make_dataclass(cls_name, own, bases=(base,), namespace={"__doc__": doc, "__module__": base.__module__})
