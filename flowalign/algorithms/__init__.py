"""Algorithms as units: one module per published method, registered by name.

Open :mod:`flowalign.algorithms.registry` for the contract every algorithm declares,
:mod:`flowalign.algorithms.flow` for the hooks of the image / video loops (``rl``, ``awm``) and
:mod:`flowalign.algorithms.dllm` for those of the masked-diffusion LM loop; then one file per
method (``grpo.py``, ``branch_grpo.py``, ..., ``igpo.py``). ``flowalign ls algorithms`` lists them.

Importing this package imports every module in it, so each registers itself.
"""

from __future__ import annotations

import importlib
import pkgutil

from flowalign.algorithms.registry import (
    ALGORITHMS,
    Algorithm,
    algorithm_config_class,
    algorithm_names,
    get_algorithm,
    register_algorithm,
)

__all__ = ["ALGORITHMS", "Algorithm", "algorithm_config_class", "algorithm_names", "get_algorithm", "register_algorithm"]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
