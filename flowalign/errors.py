"""The errors flowalign expects a user to meet, each with a message that says what to do.

The CLI prints any :class:`FlowalignError` as one short line (``flowalign: <kind>: <message>``) and
exits with status 2; ``--debug`` shows the traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

__all__ = ["FlowalignError", "ConfigError", "CheckpointError", "RunDirError", "ModelLoadError", "TrainingInterrupted", "loading"]


class FlowalignError(Exception):
    """Base of the errors caused by input, files or the machine rather than by a bug."""

    kind = "error"


class ConfigError(FlowalignError, ValueError):
    """A configuration problem; the message starts with the offending key (or file)."""

    kind = "config error"


class CheckpointError(FlowalignError):
    """A checkpoint cannot be written or read back (the message names the folder and the cause)."""

    kind = "checkpoint error"


class RunDirError(FlowalignError):
    """A run directory holds another run, or a run that cannot be continued as asked."""

    kind = "run directory"


class ModelLoadError(FlowalignError):
    """A model (or reward model) could not be loaded from the path or hub id given."""

    kind = "model error"


class TrainingInterrupted(FlowalignError):
    """SIGINT / SIGTERM stopped a run after a checkpoint was saved (exit status 130 / 143)."""

    kind = "interrupted"

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def loading(key: str, path: str) -> Iterator[None]:
    """Turn a failure to load ``path`` (the value of config key ``key``) into one
    :class:`ModelLoadError` line: the loader's first message line, and where paths are looked up."""
    try:
        yield
    except FlowalignError:
        raise
    except (OSError, ValueError, ImportError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        offline = " (HF_HUB_OFFLINE=1 is set: hub ids load only from the local cache)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ModelLoadError(f"{key}: cannot load {path!r}: {first.strip()}. A local folder must exist; a hub id "
                             f"(owner/name) needs network access or a cached copy{offline}.") from err
