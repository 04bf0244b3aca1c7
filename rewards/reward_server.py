"""The reward server: serve any reward over HTTP (JSON + base64 PNG, bearer token, never pickle).
See :mod:`flowalign.rewards.remote` for the protocol and the client.

The server expects hostile input; every limit below is an argument of :func:`serve_reward` /
:func:`serve_from_config` and a flag of ``flowalign serve-reward`` (defaults in brackets):

* **Auth.** Every request needs ``Authorization: Bearer <token>`` (compared in constant time, never
  logged; 401 otherwise). :func:`serve_reward` without a token makes a random one
  (``server.token``); ``flowalign serve-reward`` without ``$FLOWALIGN_REWARD_TOKEN`` refuses to
  start. Serving without auth needs ``allow_no_auth=True`` / ``--no-auth`` and a loopback host
  (127.0.0.0/8, ::1, localhost); anything else refuses to start with a :class:`ConfigError`.
* **Connections.** At most ``max_connections`` [64] handler threads. When all are taken, the
  connection that has waited longest for its headers (over 1 s) is dropped to make room, so idle
  connections cannot starve real clients; otherwise a new connection waits up to ``queue_timeout``
  [30 s] for a thread (later ones wait in the listen backlog), then gets 503. The request line
  and headers must arrive within ``timeout`` [15 s] of the connection opening, however slowly they
  trickle in, and the body within ``timeout`` plus 1 s per MiB, with no gap longer than
  ``timeout``; a late or stalled connection is dropped.
* **Body.** ``Content-Length`` is required (411; chunked bodies are refused) and checked against
  ``max_body_bytes`` [64 MiB, ``--max-body-mb``] before a byte of the body is read (413).
* **JSON.** Must be UTF-8 and nest at most ``max_json_depth`` [32] levels, checked by a linear scan
  before parsing (400; never a dropped connection from a RecursionError).
* **Pixels.** Every PNG header (IHDR) is read from the bytes before anything is decompressed;
  an image over ``max_image_pixels`` [4096 x 4096 = 16.8 MP] or a request over
  ``max_request_pixels`` [64 Mi = 67.1 MP, all images / frames together] is refused with 413 naming
  the limit, the entry (``media[i]`` / ``media[i][f]``) and its size; non-PNG and malformed
  headers are 400. PIL's own guard (``Image.MAX_IMAGE_PIXELS``) stays on as a second line
  (``serve_from_config`` lowers it to ``max_image_pixels`` while it serves).
* **Admission.** Reading the body, decoding and scoring happen inside a semaphore of
  ``max_concurrent`` [2] slots (the reward itself runs one batch at a time, under a lock); a
  request waits up to ``queue_timeout`` for a slot, then gets 503. So concurrent requests cannot
  add up: the server's working memory beyond the model stays around
  ``max_concurrent * (4 * max_body_bytes + 15 B * max_request_pixels)`` (about 2.5 GB with the
  defaults), plus 64 KiB per open connection.
* Errors are ``{"error": message, ...}`` JSON with a 4xx / 5xx status, also for http.server's own
  (malformed request line, oversized headers, unknown method); a failing reward is a 500 and the
  server keeps serving.

Not protected: plain HTTP is not encrypted (bind loopback, or put a TLS proxy in front); there is
no per-client rate limit, so a client holding the token can keep the server busy within these
limits; the reward's own cost on valid input and the memory of its model are the reward's; SYN
floods and exhausting the process's file descriptors are the operating system's to handle.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import numpy as np
from torch import Tensor

from flowalign.errors import ConfigError

from ._remote_protocol import (
    _PAYLOAD_KEYS,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_REQUEST_PIXELS,
    MEDIA_MODALITIES,
    PROTOCOL_VERSION,
    TOKEN_ENV,
    PayloadError,
    PayloadTooLarge,
    decode_media,
)
from .base import Reward, as_reward_output

DEFAULT_MAX_BODY_BYTES = 64 * 2**20
DEFAULT_MAX_JSON_DEPTH = 32
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_MAX_CONCURRENT = 2
DEFAULT_TIMEOUT = 15.0
DEFAULT_QUEUE_TIMEOUT = 30.0
_MIN_BODY_RATE = 2**20  # bytes / s a body may take on top of `timeout` (64 MiB: 64 s more)
_LOOPBACK_HELP = "a loopback host (127.0.0.0/8, ::1, localhost)"

# ------------------------------------------------------------------------------------------ checks


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a literal loopback address (127.0.0.0/8, ::1).

    Other host names are not resolved and count as non-loopback; ``""`` and ``0.0.0.0`` (every
    interface) are not loopback.
    """
    if not isinstance(host, str):
        return False
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


_JSON_SPECIAL = b'"\\[]{}'
_NOT_JSON_SPECIAL = bytes(b for b in range(256) if b not in _JSON_SPECIAL)
_DEPTH_CHUNK = 1 << 20


def json_too_deep(body: bytes, max_depth: int) -> bool:
    """Whether the JSON text ``body`` nests arrays / objects deeper than ``max_depth``.

    A linear scan of the bracket, quote and backslash bytes, vectorized over 1 MiB chunks (bounded
    memory, about a second for 64 MiB of brackets; chunks without any, such as base64, are skipped):
    brackets inside strings do not count, escaped quotes do not end a string. Nothing is parsed, so
    a malformed body may pass (and then fails parsing).
    """
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    in_string, escape_next, depth = False, False, 0
    for start in range(0, len(body), _DEPTH_CHUNK):
        piece = body[start:start + _DEPTH_CHUNK]
        if not piece.translate(None, _NOT_JSON_SPECIAL):
            escape_next = False  # no backslash, quote or bracket here: nothing changes
            continue
        c = np.frombuffer(piece, dtype=np.uint8)
        idx = np.arange(len(c), dtype=np.int32)
        backslash = c == ord("\\")
        last_other = np.maximum.accumulate(np.where(backslash, -1, idx))
        run = idx - last_other  # length of the run of backslashes ending here
        run[last_other == -1] += escape_next  # a run carried over from the previous chunk (its parity)
        escapes = backslash & (run % 2 == 1)  # this backslash escapes the next byte
        escaped = np.empty(len(c), dtype=bool)
        escaped[0], escaped[1:] = escape_next, escapes[:-1]
        quotes = (c == ord('"')) & ~escaped
        inside = (np.cumsum(quotes, dtype=np.int32) % 2 == 1) ^ in_string  # within a string after this byte
        step = ((c == ord("[")) | (c == ord("{"))).astype(np.int8) - ((c == ord("]")) | (c == ord("}")))
        step[inside] = 0
        running = np.cumsum(step, dtype=np.int64) + depth
        if int(running.max()) > max_depth:
            return True
        depth, in_string, escape_next = int(running[-1]), bool(inside[-1]), bool(escapes[-1])
    return False


def _parse_score_request(body: bytes, state: "_State") -> tuple[Tensor, list[str], list[dict] | None]:
    if json_too_deep(body, state.max_json_depth):
        raise PayloadError(f"request JSON nests deeper than this server's max_json_depth={state.max_json_depth}")
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise PayloadError(f"request body is not valid JSON: not UTF-8 ({err})") from err
    except json.JSONDecodeError as err:
        raise PayloadError(f"request body is not valid JSON: {err}") from err
    except RecursionError as err:  # json_too_deep should have caught it; never drop the connection
        raise PayloadError("request JSON nests too deeply") from err
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
    if len(prompts) > state.max_batch:
        raise PayloadTooLarge(f"batch of {len(prompts)} exceeds this server's max_batch={state.max_batch}; split it",
                              limit="max_batch", max_batch=state.max_batch)
    media = decode_media(media, state.reward.modality, state.max_image_pixels, state.max_request_pixels)
    return media, prompts, metadata


def _json_floats(values: Tensor) -> list[float]:
    return [float(v) for v in values.detach().float().cpu().tolist()]


def _token_digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


# ------------------------------------------------------------------------------------------ server


class _DeadlineReader(io.RawIOBase):
    """The connection's socket as a raw stream whose reads must all finish by ``handler.deadline``
    (one budget for the request line + headers, one for the body: trickling bytes does not extend it)
    and never wait more than ``timeout`` for the next bytes."""

    def __init__(self, handler: "_Handler") -> None:
        self._handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._handler.deadline - time.monotonic()
        if left <= 0 or self._handler.evicted:
            raise TimeoutError("the request did not arrive in time")
        connection = self._handler.connection
        connection.settimeout(min(left, self._handler.server.state.timeout))
        n = connection.recv_into(buffer)
        if self._handler.evicted:  # its socket was shut down to make room for a new connection
            raise TimeoutError("dropped while waiting for its headers, to make room for a new connection")
        return n


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"
    protocol_version = "HTTP/1.0"  # one request per connection
    server_version, sys_version = "flowalign-reward", ""

    def setup(self) -> None:
        self.deadline = time.monotonic() + self.server.state.timeout  # request line + headers
        self._replied = self.evicted = False
        super().setup()
        self.rfile.close()  # replaced by a reader that enforces the deadline
        self.rfile = io.BufferedReader(_DeadlineReader(self), 1 << 16)
        self.server.waiting_for_headers(self, True)

    def parse_request(self) -> bool:
        try:
            return super().parse_request()  # reads the headers
        finally:
            self.server.waiting_for_headers(self, False)

    def finish(self) -> None:
        self.server.waiting_for_headers(self, False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        if self.server.state.verbose:
            super().log_message(format, *args)

    def _reply(self, status: int, body: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(body).encode()
        self._replied = True
        self.connection.settimeout(self.server.state.timeout)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="flowalign-reward"')
        if status == 503:
            self.send_header("Retry-After", "1")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        if close:
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, header too long, unknown method) as JSON."""
        self.close_connection = True
        if getattr(self, "request_version", None) == "HTTP/0.9":  # a garbled request line: still a status line
            self.request_version = "HTTP/1.0"
        self._reply(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def _authorized(self) -> bool:
        token = self.server.state.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(_token_digest(given), self.server.state.expected_digest):
            return True
        self._reply(401, {"error": "missing or wrong bearer token (send 'Authorization: Bearer <token>')"})
        return False

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/info":
            self._reply(404, {"error": f"unknown path {self.path[:200]!r}; GET /info or POST /score"})
            return
        state = self.server.state
        self._reply(200, {"name": state.reward.name, "modality": state.reward.modality, "max_batch": state.max_batch,
                          "protocol": PROTOCOL_VERSION, "max_body_bytes": state.max_body_bytes,
                          "max_image_pixels": state.max_image_pixels, "max_request_pixels": state.max_request_pixels})

    def do_POST(self) -> None:  # noqa: N802
        try:
            self._score()
        except (TimeoutError, ConnectionError):
            raise  # the client is gone or too slow: drop the connection (handle_one_request / handle_error)
        except Exception as err:  # a bug of ours: answer rather than drop the connection
            if self._replied:
                raise
            self._reply(500, {"error": f"reward server failed on this request: {type(err).__name__}: {err}"}, close=True)

    def _score(self) -> None:
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/score":
            self._reply(404, {"error": f"unknown path {self.path[:200]!r}; POST /score"})
            return
        state = self.server.state
        if self.headers.get("Transfer-Encoding"):
            self._reply(411, {"error": "chunked / encoded bodies are not accepted; send a Content-Length"}, close=True)
            return
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            self._reply(411, {"error": "Content-Length header required"}, close=True)
            return
        length = lengths[0]
        if len(lengths) > 1 or not re.fullmatch(r"[0-9]{1,20}", length.strip()):
            self._reply(400, {"error": f"bad Content-Length {length[:40]!r}"}, close=True)
            return
        size = int(length)
        if size > state.max_body_bytes:
            self._reply(413, {"error": f"body of {size:,} bytes exceeds this server's max_body_bytes={state.max_body_bytes:,}",
                              "limit": "max_body_bytes", "max_body_bytes": state.max_body_bytes}, close=True)
            return
        if not state.admission.acquire(timeout=state.queue_timeout):
            self._discard(size)  # so that the client reads the 503 rather than a reset connection
            self._reply(503, {"error": f"server busy: {state.max_concurrent} request(s) in progress for longer than "
                                       f"queue_timeout={state.queue_timeout:g}s; retry later"}, close=True)
            return
        try:
            status, answer = self._admitted(size)
        finally:
            state.admission.release()
        self._reply(status, answer, close=status != 200)

    def _admitted(self, size: int) -> tuple[int, dict[str, Any]]:
        """Read, decode and score one request (inside the admission semaphore); returns the answer."""
        state = self.server.state
        self.deadline = time.monotonic() + state.timeout + size / _MIN_BODY_RATE
        body = self.rfile.read(size)
        if len(body) != size:
            return 400, {"error": f"request body ended after {len(body):,} of {size:,} bytes"}
        try:
            media, prompts, metadata = _parse_score_request(body, state)
        except PayloadTooLarge as err:
            return 413, {"error": f"request too large: {err}", **err.details}
        except PayloadError as err:
            return 400, {"error": f"malformed /score request: {err}"}
        del body
        try:
            with state.lock:
                out = as_reward_output(state.reward(media, prompts, metadata))
            return 200, {"scores": _json_floats(out.scores),
                         "components": {k: _json_floats(v) for k, v in out.components.items()},
                         "valid": None if out.valid is None else [bool(v) for v in out.valid.cpu().tolist()]}
        except Exception as err:  # the reward's own failure: report it, keep serving
            return 500, {"error": f"reward {state.reward.name!r} raised {type(err).__name__}: {err}"}

    def _discard(self, size: int) -> None:
        self.deadline = time.monotonic() + self.server.state.timeout + size / _MIN_BODY_RATE
        while size > 0:
            chunk = self.rfile.read(min(size, 1 << 16))
            if not chunk:
                return
            size -= len(chunk)


class _State:
    def __init__(self, reward: Reward, token: str | None, verbose: bool, **limits: Any) -> None:
        self.reward, self.token, self.verbose = reward, token, verbose
        self.expected_digest = None if token is None else _token_digest(f"Bearer {token}")
        self.limits = limits
        for key, value in limits.items():
            setattr(self, key, value)
        self.lock = threading.Lock()  # one reward call at a time
        self.admission = threading.BoundedSemaphore(self.max_concurrent)


def _raw_reply(request: socket.socket, status: int, message: str) -> None:
    """Answer a connection no handler thread will take (best effort, never blocks long)."""
    data = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.0 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
    try:
        request.settimeout(1.0)
        request.sendall(head.encode() + data)
    except OSError:
        pass


class _HTTPServer(HTTPServer):
    """One daemon thread per connection, at most ``max_connections`` of them."""

    request_queue_size = 128
    state: _State

    def __init__(self, address: tuple[str, int], state: _State) -> None:
        self.state = state
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(state.max_connections)
        self._idle: dict[_Handler, float] = {}  # connections still waiting for their headers -> since when
        self._idle_lock = threading.Lock()
        self.closing = threading.Event()
        super().__init__(address, _Handler)

    def waiting_for_headers(self, handler: _Handler, waiting: bool) -> None:
        with self._idle_lock:
            if waiting:
                self._idle[handler] = time.monotonic()
            else:
                self._idle.pop(handler, None)

    def _evict_idle(self) -> bool:
        """Drop the connection that has waited longest for its headers, if for over a second (half the
        timeout when shorter): all slots taken means a flood of idle connections, not slow clients."""
        with self._idle_lock:  # held while shutting the socket down: its handler cannot close it meanwhile
            if not self._idle:
                return False
            handler, since = min(self._idle.items(), key=lambda item: item[1])
            if time.monotonic() - since < min(1.0, self.state.timeout / 2):
                return False
            del self._idle[handler]
            handler.evicted = True
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)  # wakes its blocked read
            except OSError:
                pass
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        deadline, evicted_at = time.monotonic() + self.state.queue_timeout, 0.0
        while not self._slots.acquire(timeout=0.05):  # meanwhile new connections wait in the listen backlog
            if time.monotonic() - evicted_at > 0.5 and self._evict_idle():
                evicted_at = time.monotonic()
            if self.closing.is_set() or time.monotonic() >= deadline:
                _raw_reply(request, 503, f"server busy: all max_connections={self.state.max_connections} connection "
                                         f"slots taken for longer than queue_timeout={self.state.queue_timeout:g}s; retry later")
                self.shutdown_request(request)
                return
        try:
            threading.Thread(target=self._serve_connection, args=(request, client_address), daemon=True,
                             name=f"reward-server-{self.server_address[1]}-conn").start()
        except BaseException:
            self._slots.release()
            self.shutdown_request(request)
            raise

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line (verbose only) instead of a traceback: a client that hangs up is not our error."""
        if self.state.verbose:
            err = sys.exc_info()[1]
            print(f"[flowalign] reward server: connection from {client_address[0]} dropped: {type(err).__name__}: {err}",
                  file=sys.stderr)


class RewardServer:
    """A running reward server (returned by :func:`serve_reward`).

    Attributes:
        host, port: the bound address (``port`` is the real one when 0 was asked for).
        url: ``http://host:port``.
        token: the bearer token clients must send (``None`` only with ``allow_no_auth=True``); pass
            it on: ``RemoteReward(server.url, token=server.token)``.
        limits: the server's limits (``max_batch``, ``max_body_bytes``, ``max_image_pixels``,
            ``max_request_pixels``, ``max_json_depth``, ``max_connections``, ``max_concurrent``,
            ``timeout``, ``queue_timeout``).
    """

    def __init__(self, httpd: _HTTPServer) -> None:
        self._httpd = httpd
        self.host, self.port = httpd.server_address[:2]
        self.url = f"http://{'[' + self.host + ']' if ':' in self.host else self.host}:{self.port}"
        self.token = httpd.state.token
        self.limits = dict(httpd.state.limits)
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"reward-server-{self.port}", daemon=True)
        self._thread.start()
        self._closed = False

    def shutdown(self) -> None:
        """Stop serving and close the socket (idempotent); requests in flight are abandoned."""
        if self._closed:
            return
        self._closed = True
        self._httpd.closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "RewardServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:  # never the token
        return f"RewardServer({self.url}, reward={self._httpd.state.reward.name!r}, auth={self.token is not None})"


def _check_token(token: Any, where: str) -> None:
    if not isinstance(token, str) or not token or not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"{where}: the token must be a non-empty string of printable ASCII without spaces")


def _check_limits(where: str, **limits: Any) -> dict[str, Any]:
    for key, value in limits.items():
        integer = key.startswith("max_")
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not value > 0 or value == float("inf"):
            raise ConfigError(f"{where}: {key} must be a positive {'int' if integer else 'finite number of seconds'}, "
                              f"got {value!r}")
    return limits


def _no_auth_refusal(host: str, where: str) -> str | None:
    if is_loopback(host):
        return None
    return (f"{where}: serving without authentication (--no-auth / allow_no_auth=True) is only allowed on "
            f"{_LOOPBACK_HELP}, not on {host!r}; set ${TOKEN_ENV} (a long random string) instead")


def serve_reward(reward: Reward, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 max_batch: int = 64, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, verbose: bool = False, *,
                 allow_no_auth: bool = False, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS, max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, max_concurrent: int = DEFAULT_MAX_CONCURRENT,
                 timeout: float = DEFAULT_TIMEOUT, queue_timeout: float = DEFAULT_QUEUE_TIMEOUT) -> RewardServer:
    """Serve ``reward`` over HTTP in a background thread (limits: see the module docstring).

    Args:
        reward: an image or video :class:`Reward` (anything ``build_reward`` accepts is fine).
        host: interface to bind; ``"127.0.0.1"`` (default) accepts local connections only.
        port: TCP port; 0 picks a free one (read it from ``server.port``).
        token: bearer token required on every request; ``None`` makes a random one (read it from
            ``server.token``) unless ``allow_no_auth``.
        max_batch: largest batch one request may carry (413 beyond; clients split larger batches).
        max_body_bytes: largest request body accepted (413 beyond, before reading it).
        verbose: log every request to stderr.
        allow_no_auth: with ``token=None``, serve without authentication -- only on a loopback host.
        max_image_pixels: most pixels of one image / video frame, from its PNG header (413 beyond).
        max_request_pixels: most pixels of all images / frames of one request together (413 beyond).
        max_json_depth: deepest nesting of arrays / objects in a request (400 beyond).
        max_connections: most connections handled at once (one thread each).
        max_concurrent: most requests reading their body, decoding or scoring at once.
        timeout: seconds for the request line + headers, and the longest gap while reading a body.
        queue_timeout: seconds a connection / request waits for a free slot before a 503.

    Returns:
        The running :class:`RewardServer`; call ``shutdown()`` to stop it.

    Raises:
        ConfigError: a bad argument, or ``allow_no_auth`` on a non-loopback host.
    """
    from .registry import build_reward

    reward = build_reward(reward)
    if reward.modality not in MEDIA_MODALITIES:
        raise ConfigError(f"serve_reward: reward {reward.name!r} has modality {reward.modality!r}; "
                          f"only {list(MEDIA_MODALITIES)} rewards can be served")
    limits = _check_limits("serve_reward", max_batch=max_batch, max_body_bytes=max_body_bytes,
                           max_image_pixels=max_image_pixels, max_request_pixels=max_request_pixels,
                           max_json_depth=max_json_depth, max_connections=max_connections,
                           max_concurrent=max_concurrent, timeout=timeout, queue_timeout=queue_timeout)
    if token is not None:
        _check_token(token, "serve_reward")
    elif allow_no_auth:
        refusal = _no_auth_refusal(host, "serve_reward")
        if refusal:
            raise ConfigError(refusal)
    else:
        token = secrets.token_urlsafe(32)
    httpd = _HTTPServer((host, port), _State(reward, token, verbose, **limits))
    return RewardServer(httpd)


def serve_from_config(spec: Any, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                      max_batch: int = 64, stop: threading.Event | None = None, *, allow_no_auth: bool = False,
                      max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                      max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                      max_concurrent: int = DEFAULT_MAX_CONCURRENT, timeout: float = DEFAULT_TIMEOUT,
                      queue_timeout: float = DEFAULT_QUEUE_TIMEOUT) -> None:
    """Build a reward from a spec and serve it until Ctrl-C (the ``flowalign serve-reward`` command).

    Args:
        spec: a reward spec for ``build_reward`` (name, ``{"_component_": ..., **kwargs}``, object), or the
            path of a YAML file holding such a dict.
        host, port, max_batch, max_body_bytes, max_image_pixels, max_request_pixels, max_connections,
            max_concurrent, timeout, queue_timeout: as in :func:`serve_reward`.
        token: bearer token; ``None`` reads the ``FLOWALIGN_REWARD_TOKEN`` environment variable (so the
            secret stays out of the process list).
        stop: optional event that ends serving when set (for embedding; Ctrl-C always does).
        allow_no_auth: serve without a token (only on a loopback host) instead of refusing to start.

    Raises:
        ConfigError: no token and not ``allow_no_auth``; ``allow_no_auth`` on a non-loopback host; a
            bad limit. Checked before the reward is built.
        FileNotFoundError: ``spec`` names a YAML file that does not exist.
    """
    from PIL import Image

    from .registry import build_reward

    is_yaml = isinstance(spec, (str, os.PathLike)) and str(spec).endswith((".yaml", ".yml"))
    if is_yaml and not os.path.isfile(spec):
        raise FileNotFoundError(f"serve_from_config: reward config file {str(spec)!r} not found")
    token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
    if token is not None:
        _check_token(token, "serve-reward")
    elif not allow_no_auth:
        raise ConfigError(f"serve-reward: no bearer token: set ${TOKEN_ENV} to a long random string on the server and "
                          "its clients (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'), or pass "
                          f"--no-auth (allow_no_auth=True) to serve without authentication on {_LOOPBACK_HELP}")
    else:
        refusal = _no_auth_refusal(host, "serve-reward")
        if refusal:
            raise ConfigError(refusal)
    limits = dict(max_batch=max_batch, max_body_bytes=max_body_bytes, max_image_pixels=max_image_pixels,
                  max_request_pixels=max_request_pixels, max_connections=max_connections,
                  max_concurrent=max_concurrent, timeout=timeout, queue_timeout=queue_timeout)
    _check_limits("serve-reward", **limits)
    if is_yaml:
        from omegaconf import OmegaConf

        spec = OmegaConf.to_container(OmegaConf.load(spec), resolve=True)
    server = serve_reward(build_reward(spec), host=host, port=port, token=token, verbose=True,
                          allow_no_auth=allow_no_auth, **limits)
    pil_limit = Image.MAX_IMAGE_PIXELS  # PIL's guard as a second line while serving (process-wide, restored after)
    if pil_limit is None or pil_limit > max_image_pixels:
        Image.MAX_IMAGE_PIXELS = max_image_pixels
    reward = server._httpd.state.reward
    print(f"[flowalign] serving reward {reward.name!r} ({reward.modality}) at {server.url} "
          f"(auth: {'bearer token' if token else 'NONE (--no-auth, loopback only)'}, max_batch {max_batch}, "
          f"max body {max_body_bytes / 2**20:g} MiB, max {max_image_pixels:,} pixels per image and "
          f"{max_request_pixels:,} per request, {max_connections} connections, {max_concurrent} requests at once, "
          f"timeout {timeout:g}s); Ctrl-C stops", flush=True)
    stop = stop or threading.Event()
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        Image.MAX_IMAGE_PIXELS = pil_limit
