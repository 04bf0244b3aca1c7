"""Rewards over HTTP: serve any reward from another process / machine, and score against it.

Standard library only (``http.server`` + ``urllib``), JSON bodies, media as base64 PNG -- never
pickle, so a client cannot make the server run code and vice versa.

Protocol (version 1); every request carries ``Authorization: Bearer <token>`` (a server runs
without a token only when told to, on loopback):

* ``GET /info`` -> ``{"name", "modality", "max_batch", "protocol": 1}`` plus the server's size limits
  ``max_body_bytes``, ``max_image_pixels`` and ``max_request_pixels`` (the client sizes its
  requests to fit them).
* ``POST /score`` with ``{"media": [...], "prompts": [str], "metadata": [dict] | null}``; ``media`` is
  one base64 PNG per image (``"image"``) or a list of base64 PNGs, one per frame, per video
  (``"video"``). Answer: ``{"scores": [float], "components": {name: [float]}, "valid": [bool] | null}``.
* Errors: ``{"error": message, ...}`` with 400 (malformed payload, JSON nested too deeply, not a
  PNG), 401 (missing / wrong token), 404, 411 (no Content-Length), 413 (body, batch or pixel budget
  too large; the answer also names the ``limit`` and, for pixels, the entry ``where`` with its
  ``width`` / ``height``), 500 (the reward raised), 503 (busy: no free slot within the server's
  queue timeout). The client retries 502 / 503 / 504 and connection failures, never other 4xx / 500.

The server's defenses against hostile clients (auth, socket timeouts, connection and admission
caps, body and pixel budgets checked from the PNG headers before decoding, JSON depth) and what
they do not cover are listed in :mod:`flowalign.rewards.reward_server`.

Media travel at uint8 precision (``round(255 * x)``, :func:`flowalign.rewards._media.to_uint8`), the
precision at which PIL-based rewards see them anyway. The server scores one request at a time (a
lock around the reward) and binds ``127.0.0.1`` unless told otherwise; behind another host, use a
TLS-terminating proxy (the client speaks ``https://`` too).

    server = serve_reward(build_reward("pickscore", path=...), port=8765, token="s3cret")   # process A
    reward = RemoteReward("http://127.0.0.1:8765", token="s3cret")                         # process B
    out = reward(images, prompts)

``serve_reward`` without a token makes a random one: ``RemoteReward(server.url, token=server.token)``.
From the shell: ``FLOWALIGN_REWARD_TOKEN=... flowalign serve-reward reward.yaml`` (:func:`serve_from_config`);
without the variable it refuses to start unless ``--no-auth`` is given (loopback hosts only).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from ._media import check_media
from ._remote_protocol import (
    MEDIA_MODALITIES,
    PROTOCOL_VERSION,
    TOKEN_ENV,
    RemoteRewardError,
    RemoteRewardTimeout,
    decode_media,
    encode_media,
)
from .base import RewardOutput
from .reward_server import RewardServer, serve_from_config, serve_reward

__all__ = [
    "PROTOCOL_VERSION", "TOKEN_ENV", "RemoteRewardError", "RemoteRewardTimeout", "encode_media", "decode_media",
    "RewardServer", "serve_reward", "serve_from_config", "RemoteReward", "VideoAlignReward",
]


# ------------------------------------------------------------------------------------------ client


def _positive(value: Any, name: str, integer: bool = False, allow_zero: bool = False) -> Any:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"RemoteReward: {name} must be a {'non-negative' if allow_zero else 'positive'} "
                         f"{'int' if integer else 'number'}, got {value!r}")
    return value


class RemoteReward:
    """A :class:`Reward` scored by a reward server (:func:`serve_reward`).

    ``name`` and ``modality`` come from the server's ``GET /info`` (fetched on first use, so
    building the object never touches the network), unless given here; a given ``modality`` is
    checked against the server's. Batches are split to fit the server's ``max_batch``, its
    ``max_request_pixels`` and its ``max_body_bytes``; a single image over ``max_image_pixels`` (or
    a sample over the other budgets) fails before anything is sent.

    Args:
        url: ``http(s)://host:port`` of the server.
        token: bearer token (``server.token`` of :func:`serve_reward`); ``None`` reads
            ``FLOWALIGN_REWARD_TOKEN`` (no ``Authorization`` header if unset).
        timeout: seconds to wait on each connect / read.
        retries: extra attempts after a failed one (connection refused/reset, timeout, HTTP 502/503/504);
            other 4xx and 500 answers are not retried. Worst case time is about
            ``(retries + 1) * timeout + backoff * (2 ** retries - 1)``.
        backoff: seconds before the first retry, doubled after each.
        name: local name (default: the server's).
        modality: expected modality (default: the server's).
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, name: str | None = None, modality: str | None = None) -> None:
        parsed = urllib.parse.urlparse(url) if isinstance(url, str) else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"RemoteReward: url must look like http://host:port, got {url!r}")
        if modality is not None and modality not in MEDIA_MODALITIES:
            raise ValueError(f"RemoteReward: modality must be one of {list(MEDIA_MODALITIES)}, got {modality!r}")
        self.url = url.rstrip("/")
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.timeout = float(_positive(timeout, "timeout"))
        self.retries = _positive(retries, "retries", integer=True, allow_zero=True)
        self.backoff = float(_positive(backoff, "backoff", allow_zero=True))
        self._name, self._modality = name, modality
        self._info: dict[str, Any] | None = None
        self._owned_server: RewardServer | None = None  # set by tiny(): a loopback server this client owns

    @classmethod
    def tiny(cls, tmp_dir: str) -> "RemoteReward":
        """Tests only: a client of a loopback server (owned by the client, see :meth:`close`) serving
        DDPO JPEG compressibility (no weights)."""
        from .jpeg import JpegCompressibility

        server = serve_reward(JpegCompressibility(), token="tiny-token")
        reward = cls(server.url, token="tiny-token", timeout=30.0, retries=1, backoff=0.1)
        reward._owned_server = server
        return reward

    def close(self) -> None:
        """Shut down the server this client started (only :meth:`tiny` starts one)."""
        if self._owned_server is not None:
            self._owned_server.shutdown()
            self._owned_server = None

    # name / modality: attributes of the Reward protocol, resolved lazily from /info
    @property
    def name(self) -> str:
        return self._name if self._name is not None else self.info()["name"]

    @name.setter
    def name(self, value: str) -> None:
        self._name = value

    @property
    def modality(self) -> str:
        return self._modality if self._modality is not None else self.info()["modality"]

    def info(self) -> dict[str, Any]:
        """The server's ``/info`` (fetched once), checked against the given ``modality``."""
        if self._info is None:
            info = self._request("GET", "/info")
            if not isinstance(info, dict) or not {"name", "modality", "max_batch"} <= set(info):
                raise RemoteRewardError(f"reward server {self.url}: /info answered {str(info)[:200]!r}, not a reward server's info")
            if info.get("protocol") != PROTOCOL_VERSION:
                raise RemoteRewardError(f"reward server {self.url} speaks protocol {info.get('protocol')!r}, "
                                        f"this client {PROTOCOL_VERSION}")
            if self._modality is not None and info["modality"] != self._modality:
                raise RemoteRewardError(f"reward server {self.url} serves {info['name']!r} with modality "
                                        f"{info['modality']!r}, expected {self._modality!r}")
            self._info = info
        return self._info

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None, data: bytes | None = None) -> Any:
        data = data if payload is None else json.dumps(payload).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        attempts, last, timed_out = self.retries + 1, None, False
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                try:
                    message = json.loads(err.read()).get("error", "")
                except Exception:
                    message = err.reason
                if err.code in (502, 503, 504):
                    last, timed_out = f"HTTP {err.code}: {message}", False
                    continue
                raise RemoteRewardError(f"reward server {self.url}{path} answered HTTP {err.code}: {message}",
                                        status=err.code) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException, json.JSONDecodeError) as err:
                reason = err.reason if isinstance(err, urllib.error.URLError) else err
                timed_out = isinstance(reason, TimeoutError)
                last = f"{type(reason).__name__}: {reason}"
        kind = RemoteRewardTimeout if timed_out else RemoteRewardError
        raise kind(f"reward server {self.url}{path} failed after {attempts} attempt(s) (timeout {self.timeout:g}s, "
                   f"retries {self.retries}); last error: {last}. Is the server running (flowalign serve-reward)?")

    @torch.no_grad()
    def __call__(self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
                 ) -> RewardOutput:
        """Score ``B`` samples remotely; returns scores ``[B]`` on ``media``'s device."""
        info = self.info()
        media = check_media(media, info["modality"])
        batch = media.shape[0]
        if len(prompts) != batch:
            raise ValueError(f"RemoteReward {self.name!r}: got {len(prompts)} prompts for a media batch of {batch}")
        if metadata is not None and len(metadata) != batch:
            raise ValueError(f"RemoteReward {self.name!r}: got {len(metadata)} metadata entries for a media batch of {batch}")
        scores: list[float] = []
        components: dict[str, list[float]] = {}
        valid: list[bool] = []
        any_valid = False
        for n, answer in self._score_chunks(media, prompts, metadata, info):
            if not isinstance(answer, dict) or not isinstance(answer.get("scores"), list) or len(answer["scores"]) != n:
                raise RemoteRewardError(f"reward server {self.url} answered {str(answer)[:200]!r} for a batch of {n}")
            scores += answer["scores"]
            for key, values in (answer.get("components") or {}).items():
                if not isinstance(values, list) or len(values) != n:
                    raise RemoteRewardError(f"reward server {self.url}: component {key!r} has "
                                            f"{len(values) if isinstance(values, list) else values!r} values for a batch of {n}")
                components.setdefault(key, []).extend(values)
            chunk_valid = answer.get("valid")
            if chunk_valid is not None and (not isinstance(chunk_valid, list) or len(chunk_valid) != n):
                raise RemoteRewardError(f"reward server {self.url}: 'valid' is not a list of {n} booleans")
            any_valid |= chunk_valid is not None
            valid += chunk_valid if chunk_valid is not None else [True] * n
        device = media.device
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
        missing = [k for k, v in components.items() if len(v) != batch]
        if missing:
            raise RemoteRewardError(f"reward server {self.url}: components {missing} are missing from some batches")
        comps = {k: as_tensor(v) for k, v in components.items()}
        return RewardOutput(scores=as_tensor(scores), components=comps,
                            valid=torch.tensor(valid, dtype=torch.bool, device=device) if any_valid else None)

    def _score_chunks(self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None,
                      info: dict[str, Any]) -> Iterator[tuple[int, Any]]:
        """POST the batch in chunks that fit the server's limits; yields ``(chunk size, answer)``."""
        limit = lambda key: info[key] if isinstance(info.get(key), int) and info[key] > 0 else None  # noqa: E731
        modality, (height, width) = info["modality"], media.shape[-2:]
        frame_pixels = height * width
        sample_pixels = frame_pixels * (media.shape[1] if modality == "video" else 1)
        max_image, max_request = limit("max_image_pixels"), limit("max_request_pixels")
        if max_image is not None and frame_pixels > max_image:
            raise RemoteRewardError(f"RemoteReward {self.name!r}: {width}x{height} {'frames' if modality == 'video' else 'images'} "
                                    f"({frame_pixels:,} pixels) are over the server's max_image_pixels={max_image:,}", status=413)
        if max_request is not None and sample_pixels > max_request:
            raise RemoteRewardError(f"RemoteReward {self.name!r}: one sample has {sample_pixels:,} pixels, over the server's "
                                    f"max_request_pixels={max_request:,}", status=413)
        step = max(1, min(int(info["max_batch"]), max_request // sample_pixels if max_request else media.shape[0]))
        for start in range(0, media.shape[0], step):
            yield from self._post_chunk(media, prompts, metadata, start, min(start + step, media.shape[0]), limit("max_body_bytes"))

    def _post_chunk(self, media: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None,
                    start: int, stop: int, max_body: int | None) -> Iterator[tuple[int, Any]]:
        payload = {"media": encode_media(media[start:stop], self.info()["modality"]),
                   "prompts": [str(p) for p in prompts[start:stop]],
                   "metadata": None if metadata is None else [dict(m or {}) for m in metadata[start:stop]]}
        try:
            data = json.dumps(payload).encode()
        except (TypeError, ValueError) as err:
            raise TypeError(f"RemoteReward {self.name!r}: metadata must be JSON-serializable: {err}") from err
        del payload
        if max_body is not None and len(data) > max_body:
            if stop - start == 1:
                raise RemoteRewardError(f"RemoteReward {self.name!r}: sample {start} encodes to {len(data):,} bytes, over "
                                        f"the server's max_body_bytes={max_body:,}", status=413)
            del data
            middle = (start + stop) // 2
            yield from self._post_chunk(media, prompts, metadata, start, middle, max_body)
            yield from self._post_chunk(media, prompts, metadata, middle, stop, max_body)
            return
        yield stop - start, self._request("POST", "/score", data=data)

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r}, timeout={self.timeout:g}, retries={self.retries})"


class VideoAlignReward(RemoteReward):
    """VideoAlign ("videoalign"): a :class:`RemoteReward` to a server running VideoAlign's VideoReward model.

    VideoAlign (Liu et al. 2025, "Improving Video Generation with Human Feedback",
    github.com/KwaiVGI/VideoAlign) is a Qwen2-VL reward model scoring visual quality (VQ), motion
    quality (MQ), text alignment (TA) and their sum (Overall). It needs its own environment and a
    GPU, so flowalign reaches it over HTTP: on the reward machine, wrap the repository's inference
    class (``VideoVLMRewardInference(...).reward(video_paths, prompts, use_norm=True)``, which returns
    one dict per video) in a flowalign video reward, e.g.::

        class VideoAlignServerSide:                  # runs where VideoAlign is installed
            name, modality = "videoalign", "video"
            def __init__(self, checkpoint, device="cuda"):
                from inference import VideoVLMRewardInference          # VideoAlign repo
                self.model = VideoVLMRewardInference(checkpoint, device=device, dtype=torch.bfloat16)
            def __call__(self, media, prompts, metadata=None):       # media [B, F, 3, H, W]
                paths = [export_to_video(list(v.permute(0, 2, 3, 1).numpy()), fps=8) for v in media]
                rows = self.model.reward(paths, list(prompts), use_norm=True)
                return RewardOutput(torch.tensor([r["Overall"] for r in rows]),
                                    {k: torch.tensor([r[k] for r in rows]) for k in ("VQ", "MQ", "TA")})

    and serve it (``flowalign serve-reward`` with ``{_component_: "mymodule:VideoAlignServerSide", checkpoint: ...}``,
    ``--host 0.0.0.0`` and a token). The training config then names
    ``{_component_: videoalign, url: "http://reward-host:8765"}``; the server must serve a video reward.
    """

    def __init__(self, url: str = "http://127.0.0.1:8765", token: str | None = None, timeout: float = 600.0,
                 retries: int = 2, backoff: float = 1.0, name: str = "videoalign") -> None:
        super().__init__(url, token=token, timeout=timeout, retries=retries, backoff=backoff, name=name, modality="video")

    @classmethod
    def tiny(cls, tmp_dir: str) -> "VideoAlignReward":
        """Tests only: a client of a loopback server (owned by the client) serving a stand-in video
        reward (:meth:`FrameAggregatedReward.tiny`); the real VideoAlign model is not involved."""
        from .video import FrameAggregatedReward

        server = serve_reward(FrameAggregatedReward.tiny(tmp_dir), token="tiny-token")
        reward = cls(server.url, token="tiny-token", timeout=30.0, retries=1, backoff=0.1)
        reward._owned_server = server
        return reward
