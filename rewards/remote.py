"""Rewards over HTTP: serve any reward from another process / machine, and score against it.

Standard library only (``http.server`` + ``urllib``), JSON bodies, media as base64 PNG -- never
pickle, so a client cannot make the server run code and vice versa.

Protocol (version 1); every request carries ``Authorization: Bearer <token>`` when the server has one:

* ``GET /info`` -> ``{"name", "modality", "max_batch", "protocol": 1}``.
* ``POST /score`` with ``{"media": [...], "prompts": [str], "metadata": [dict] | null}``; ``media`` is
  one base64 PNG per image (``"image"``) or a list of base64 PNGs, one per frame, per video
  (``"video"``). Answer: ``{"scores": [float], "components": {name: [float]}, "valid": [bool] | null}``.
* Errors: ``{"error": message}`` with 400 (malformed payload), 401 (missing / wrong token),
  404, 411, 413 (body or batch too large), 500 (the reward raised).

Media travel at uint8 precision (``round(255 * x)``, :func:`flowalign.rewards._media.to_uint8`), the
precision at which PIL-based rewards see them anyway. The server scores one request at a time (a
lock around the reward) and binds ``127.0.0.1`` unless told otherwise; behind another host, use a
token and a TLS-terminating proxy (the client speaks ``https://`` too).

    server = serve_reward(build_reward("pickscore", path=...), port=8765, token="s3cret")   # process A
    reward = RemoteReward("http://127.0.0.1:8765", token="s3cret")                         # process B
    out = reward(images, prompts)

From the shell: ``flowalign serve-reward reward.yaml`` (:func:`serve_from_config`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import http.client
import io
import json
import math
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

import torch
from PIL import Image
from torch import Tensor

from ._media import check_media, from_pil_images, to_uint8
from .base import Reward, RewardOutput, as_reward_output

__all__ = [
    "PROTOCOL_VERSION", "TOKEN_ENV", "RemoteRewardError", "RemoteRewardTimeout", "encode_media", "decode_media",
    "RewardServer", "serve_reward", "serve_from_config", "RemoteReward", "VideoAlignReward",
]

PROTOCOL_VERSION = 1
TOKEN_ENV = "FLOWALIGN_REWARD_TOKEN"  # token source when none is passed (client and serve_from_config)
MEDIA_MODALITIES = ("image", "video")
_PAYLOAD_KEYS = {"media", "prompts", "metadata"}


class RemoteRewardError(RuntimeError):
    """A remote reward call failed; ``status`` is the HTTP status when the server answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RemoteRewardTimeout(RemoteRewardError):
    """The reward server did not answer within the timeout, on every attempt."""


class PayloadError(ValueError):
    """A malformed request (answered with HTTP 400 and this message)."""


# ------------------------------------------------------------------------------------------ media


def _png_b64(array: Any) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_media(media: Tensor, modality: str) -> list:
    """``[B, 3, H, W]`` -> ``B`` base64 PNGs, or ``[B, F, 3, H, W]`` -> ``B`` lists of ``F`` base64 PNGs."""
    arrays = to_uint8(check_media(media, modality))  # [B, (F,) H, W, 3] uint8
    if modality == "image":
        return [_png_b64(a) for a in arrays]
    return [[_png_b64(frame) for frame in video] for video in arrays]


def _decode_png(item: Any, where: str) -> Image.Image:
    if not isinstance(item, str):
        raise PayloadError(f"{where} must be a base64 PNG string, got {type(item).__name__}")
    try:
        data = base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as err:
        raise PayloadError(f"{where} is not valid base64: {err}") from err
    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "PNG":
            raise PayloadError(f"{where} is a {image.format} image; only PNG is accepted")
        image.load()
    except PayloadError:
        raise
    except Exception as err:  # PIL raises many types for corrupt data
        raise PayloadError(f"{where} is not a readable PNG: {err}") from err
    return image.convert("RGB")


def decode_media(items: Any, modality: str) -> Tensor:
    """Inverse of :func:`encode_media`: ``[B, 3, H, W]`` or ``[B, F, 3, H, W]`` float32 in [0, 1].

    Raises:
        PayloadError: naming the offending ``media[i]`` / ``media[i][f]`` entry.
    """
    if not isinstance(items, list) or not items:
        raise PayloadError(f"'media' must be a non-empty list, got {type(items).__name__ if not isinstance(items, list) else 'an empty list'}")
    try:
        if modality == "image":
            return from_pil_images([_decode_png(item, f"media[{i}]") for i, item in enumerate(items)])
        videos = []
        for i, frames in enumerate(items):
            if not isinstance(frames, list) or not frames:
                raise PayloadError(f"media[{i}] must be a non-empty list of per-frame base64 PNGs for a video reward")
            videos.append(from_pil_images([_decode_png(f, f"media[{i}][{j}]") for j, f in enumerate(frames)]))
        shapes = {tuple(v.shape) for v in videos}
        if len(shapes) > 1:
            raise PayloadError(f"videos in 'media' differ in shape (frames, 3, H, W): {sorted(shapes)}")
        return torch.stack(videos)
    except PayloadError:
        raise
    except ValueError as err:  # from_pil_images: frames / images of different sizes
        raise PayloadError(str(err)) from err


# ------------------------------------------------------------------------------------------ server


def _parse_score_request(body: bytes, modality: str, max_batch: int) -> tuple[Tensor, list[str], list[dict] | None]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PayloadError(f"request body is not valid JSON: {err}") from err
    if not isinstance(payload, dict):
        raise PayloadError(f"request body must be a JSON object with keys {sorted(_PAYLOAD_KEYS)}, got {type(payload).__name__}")
    unknown, missing = sorted(set(payload) - _PAYLOAD_KEYS), sorted({"media", "prompts"} - set(payload))
    if unknown or missing:
        raise PayloadError(f"request keys: unknown {unknown}, missing {missing}; expected {sorted(_PAYLOAD_KEYS)}")
    prompts, metadata, media = payload["prompts"], payload.get("metadata"), payload["media"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise PayloadError("'prompts' must be a list of strings")
    if not isinstance(media, list) or len(media) != len(prompts):
        raise PayloadError(f"'media' must be a list with one entry per prompt ({len(prompts)}), "
                           f"got {len(media) if isinstance(media, list) else type(media).__name__}")
    if metadata is not None and (not isinstance(metadata, list) or len(metadata) != len(prompts)
                                 or not all(isinstance(m, dict) for m in metadata)):
        raise PayloadError(f"'metadata' must be null or a list of {len(prompts)} objects")
    if len(prompts) > max_batch:
        raise OverflowError(f"batch of {len(prompts)} exceeds this server's max_batch={max_batch}; split it")
    return decode_media(media, modality), prompts, metadata


def _json_floats(values: Tensor) -> list[float]:
    return [float(v) for v in values.detach().float().cpu().tolist()]


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        if self.server.state.verbose:
            super().log_message(format, *args)

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="flowalign-reward"')
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        token = self.server.state.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return True
        self._reply(401, {"error": "missing or wrong bearer token (send 'Authorization: Bearer <token>')"})
        return False

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/info":
            self._reply(404, {"error": f"unknown path {self.path!r}; GET /info or POST /score"})
            return
        state = self.server.state
        self._reply(200, {"name": state.reward.name, "modality": state.reward.modality,
                          "max_batch": state.max_batch, "protocol": PROTOCOL_VERSION})

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/score":
            self._reply(404, {"error": f"unknown path {self.path!r}; POST /score"})
            return
        state = self.server.state
        length = self.headers.get("Content-Length")
        if length is None:
            self._reply(411, {"error": "Content-Length header required"})
            return
        if not length.isdigit():
            self._reply(400, {"error": f"bad Content-Length {length!r}"})
            return
        if int(length) > state.max_body_bytes:
            self._reply(413, {"error": f"body of {length} bytes exceeds max_body_bytes={state.max_body_bytes}"})
            self.close_connection = True
            return
        body = self.rfile.read(int(length))
        try:
            media, prompts, metadata = _parse_score_request(body, state.reward.modality, state.max_batch)
        except PayloadError as err:
            self._reply(400, {"error": f"malformed /score request: {err}"})
            return
        except OverflowError as err:
            self._reply(413, {"error": str(err)})
            return
        try:
            with state.lock:
                out = as_reward_output(state.reward(media, prompts, metadata))
        except Exception as err:  # the reward's own failure: report it, keep serving
            self._reply(500, {"error": f"reward {state.reward.name!r} raised {type(err).__name__}: {err}"})
            return
        self._reply(200, {"scores": _json_floats(out.scores),
                          "components": {k: _json_floats(v) for k, v in out.components.items()},
                          "valid": None if out.valid is None else [bool(v) for v in out.valid.cpu().tolist()]})


class _State:
    def __init__(self, reward: Reward, token: str | None, max_batch: int, max_body_bytes: int, verbose: bool) -> None:
        self.reward, self.token, self.max_batch = reward, token, max_batch
        self.max_body_bytes, self.verbose = max_body_bytes, verbose
        self.lock = threading.Lock()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a slow request never blocks shutdown
    state: _State


class RewardServer:
    """A running reward server (returned by :func:`serve_reward`).

    Attributes:
        host, port: the bound address (``port`` is the real one when 0 was asked for).
        url: ``http://host:port``.
    """

    def __init__(self, httpd: _HTTPServer) -> None:
        self._httpd = httpd
        self.host, self.port = httpd.server_address[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"reward-server-{self.port}", daemon=True)
        self._thread.start()
        self._closed = False

    def shutdown(self) -> None:
        """Stop serving and close the socket (idempotent); requests in flight are abandoned."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "RewardServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"RewardServer({self.url}, reward={self._httpd.state.reward.name!r})"


def serve_reward(reward: Reward, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 max_batch: int = 64, max_body_bytes: int = 1 << 30, verbose: bool = False) -> RewardServer:
    """Serve ``reward`` over HTTP in a background thread.

    Args:
        reward: an image or video :class:`Reward` (anything ``build_reward`` accepts is fine).
        host: interface to bind; ``"127.0.0.1"`` (default) accepts local connections only.
        port: TCP port; 0 picks a free one (read it from ``server.port``).
        token: bearer token required on every request (``None``: no auth -- loopback use only).
        max_batch: largest batch one request may carry (clients split larger batches).
        max_body_bytes: largest request body accepted (413 beyond).
        verbose: log every request to stderr.

    Returns:
        The running :class:`RewardServer`; call ``shutdown()`` to stop it.
    """
    from .registry import build_reward

    reward = build_reward(reward)
    if reward.modality not in MEDIA_MODALITIES:
        raise ValueError(f"serve_reward: reward {reward.name!r} has modality {reward.modality!r}; "
                         f"only {list(MEDIA_MODALITIES)} rewards can be served")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"serve_reward: max_batch must be a positive int, got {max_batch!r}")
    if token is not None and (not isinstance(token, str) or not token):
        raise ValueError("serve_reward: token must be a non-empty string or None")
    httpd = _HTTPServer((host, port), _Handler)
    httpd.state = _State(reward, token, max_batch, int(max_body_bytes), verbose)
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[flowalign] warning: reward server on {host} without a token accepts requests from anyone who can "
              "reach it; pass token=...", file=sys.stderr)
    return RewardServer(httpd)


def serve_from_config(spec: Any, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                      max_batch: int = 64, stop: threading.Event | None = None) -> None:
    """Build a reward from a spec and serve it until Ctrl-C (the ``flowalign serve-reward`` command).

    Args:
        spec: a reward spec for ``build_reward`` (name, ``{"_component_": ..., **kwargs}``, object), or the
            path of a YAML file holding such a dict.
        host, port, max_batch: as in :func:`serve_reward`.
        token: bearer token; ``None`` reads the ``FLOWALIGN_REWARD_TOKEN`` environment variable (so the
            secret stays out of the process list), and no auth if that is unset too.
        stop: optional event that ends serving when set (for embedding; Ctrl-C always does).
    """
    from .registry import build_reward

    if isinstance(spec, (str, os.PathLike)) and str(spec).endswith((".yaml", ".yml")):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"serve_from_config: reward config file {str(spec)!r} not found")
        from omegaconf import OmegaConf

        spec = OmegaConf.to_container(OmegaConf.load(spec), resolve=True)
    token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
    server = serve_reward(build_reward(spec), host=host, port=port, token=token, max_batch=max_batch, verbose=True)
    reward = server._httpd.state.reward
    print(f"[flowalign] serving reward {reward.name!r} ({reward.modality}) at {server.url} "
          f"(auth: {'bearer token' if token else 'none'}, max_batch {max_batch}); Ctrl-C stops", flush=True)
    stop = stop or threading.Event()
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()


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
    checked against the server's. Batches larger than the server's ``max_batch`` are split.

    Args:
        url: ``http(s)://host:port`` of the server.
        token: bearer token; ``None`` reads ``FLOWALIGN_REWARD_TOKEN`` (no auth if unset).
        timeout: seconds to wait on each connect / read.
        retries: extra attempts after a failed one (connection refused/reset, timeout, HTTP 502/503/504);
            400 / 401 / 413 / 500 answers are not retried. Worst case time is about
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

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
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
        step = int(info["max_batch"])
        for start in range(0, batch, step):
            stop = min(start + step, batch)
            payload = {"media": encode_media(media[start:stop], info["modality"]),
                       "prompts": [str(p) for p in prompts[start:stop]],
                       "metadata": None if metadata is None else [dict(m or {}) for m in metadata[start:stop]]}
            try:
                json.dumps(payload["metadata"])
            except (TypeError, ValueError) as err:
                raise TypeError(f"RemoteReward {self.name!r}: metadata must be JSON-serializable: {err}") from err
            answer = self._request("POST", "/score", payload)
            n = stop - start
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
