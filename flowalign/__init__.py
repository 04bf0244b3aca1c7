"""flowalign: align diffusion / flow-matching generators and masked-diffusion LMs with rewards.

The top-level package imports nothing heavy; ``flowalign.train`` and friends load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["train", "sample", "evaluate", "load_config"]


def __getattr__(name: str):
    if name in ("train", "sample", "evaluate"):
        from flowalign import api

        return getattr(api, name)
    if name == "load_config":
        from flowalign.config import load_config

        return load_config
    raise AttributeError(f"module 'flowalign' has no attribute {name!r}")
