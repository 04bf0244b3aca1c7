"""The reward server: serve any reward over HTTP (JSON + base64 PNG, bearer token, never pickle).
See :mod:`flowalign.rewards.remote` for the protocol and the client."""

from __future__ import annotations

import hmac
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from torch import Tensor

from ._remote_protocol import (
    _PAYLOAD_KEYS,
    MEDIA_MODALITIES,
    PROTOCOL_VERSION,
    TOKEN_ENV,
    PayloadError,
    decode_media,
)
from .base import Reward, as_reward_output

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
