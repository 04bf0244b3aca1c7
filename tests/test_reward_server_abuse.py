"""The reward server under abuse, on loopback only, every test bounded in time and traffic:
decompression bombs refused from the PNG header without decoding (peak RSS of a server process
measured), pixel / body / batch budgets, the admission and connection caps (503), half-sent and
trickled requests dropped after the read timeout with the thread count bounded, over-deep JSON
answered 400, http.server's own errors as JSON, and the token policy of ``serve_reward`` and
``flowalign serve-reward`` (refuses to start without a token; ``--no-auth`` on loopback only)."""

from __future__ import annotations

import base64
import io
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib

import pytest
import torch
from PIL import Image

import flowalign.cli as cli
from flowalign.errors import ConfigError
from flowalign.rewards.jpeg import JpegCompressibility
from flowalign.rewards.remote import TOKEN_ENV, RemoteReward, RemoteRewardError, serve_reward
from flowalign.rewards.reward_server import is_loopback, json_too_deep

TOKEN = "abuse-token"


class Counting:
    """Mean pixel value; counts its calls and the batch sizes it saw."""

    name, modality = "counting", "image"

    def __init__(self, seconds: float = 0.0) -> None:
        self.batches: list[int] = []
        self.seconds = seconds

    def __call__(self, media, prompts, metadata=None):
        self.batches.append(len(media))
        time.sleep(self.seconds)
        return media.mean(dim=(1, 2, 3))


@pytest.fixture
def server():
    servers = []

    def start(reward=None, **kwargs):
        kwargs.setdefault("token", TOKEN)
        s = serve_reward(reward if reward is not None else Counting(), **kwargs)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.shutdown()


def png_bytes(width: int, height: int, color=(0, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def score_body(images: list[str], prompt: str = "a") -> bytes:
    return json.dumps({"media": images, "prompts": [prompt] * len(images)}).encode()


def post(url: str, body: bytes, token: str | None = TOKEN, timeout: float = 30.0) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + "/score", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def raw_exchange(url: str, data: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    """Send raw bytes on one connection and read the whole answer (the server closes after it)."""
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    """``VmHWM`` / ``VmRSS`` (kB) and ``Threads`` of a process, from /proc."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "Threads"):
                values[key] = int(value.split()[0])
    return values


_SERVER_SCRIPT = """
import json, os, sys, threading
threading.Timer(float(sys.argv[2]), os._exit, (3,)).start()  # stops by itself, whatever happens
from flowalign.rewards.jpeg import JpegCompressibility
from flowalign.rewards.reward_server import serve_reward
server = serve_reward(JpegCompressibility(), token=%r, **json.loads(sys.argv[1]))
print(server.url, flush=True)
sys.stdin.read()  # until the test closes stdin
os._exit(0)
""" % TOKEN


@pytest.fixture
def server_process():
    """Start ``serve_reward(JpegCompressibility(), **kwargs)`` in a subprocess; yields ``(process, url)``."""
    procs = []

    def start(lifetime: float = 120.0, **kwargs):
        proc = subprocess.Popen([sys.executable, "-c", _SERVER_SCRIPT, json.dumps(kwargs), str(lifetime)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        procs.append(proc)
        ready, _, _ = select.select([proc.stdout], [], [], 90)
        assert ready, "the server subprocess did not start within 90 s"
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        return proc, url

    yield start
    for proc in procs:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# ------------------------------------------------------------------------------ pixel budgets


@pytest.fixture(scope="module")
def bomb() -> str:
    """An all-black 8000x8000 RGB PNG (64 MP, 192 MB decoded, ~190 KB compressed), base64."""
    return b64(png_bytes(8000, 8000))


def test_decompression_bombs_are_413_from_the_header_and_never_decoded(server_process, bomb):
    proc, url = server_process()
    before = proc_status(proc.pid)
    t0 = time.perf_counter()
    status, answer, _ = post(url, score_body([bomb] * 3))
    assert status == 413, answer
    assert answer["limit"] == "max_image_pixels" and answer["max_image_pixels"] == 4096 * 4096
    assert (answer["where"], answer["width"], answer["height"]) == ("media[0]", 8000, 8000)
    assert "media[0] is 8000x8000" in answer["error"] and "max_image_pixels=16,777,216" in answer["error"]
    assert time.perf_counter() - t0 < 10.0

    # concurrent bombs cannot add up either
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(post(url, score_body([bomb] * 3))[0])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [413] * 4

    peak = proc_status(proc.pid)["VmHWM"]  # kB
    assert peak < 1.5 * 2**20, f"peak RSS {peak / 2**20:.2f} GB (was {before['VmHWM'] / 2**20:.2f} GB before the bombs)"
    assert peak - before["VmHWM"] < 512 * 2**10  # well under one decoded bomb (192 MB uint8, 768 MB float32)

    # and the server still scores a normal request
    small = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    remote = RemoteReward(url, token=TOKEN, retries=0, timeout=30)
    assert torch.equal(remote(small, ["a", "b"]).scores, JpegCompressibility()(small, ["a", "b"]).scores)


def _png_header_only(width: int, height: int, crc_ok: bool = True) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    crc = zlib.crc32(b"IHDR" + ihdr) ^ (0 if crc_ok else 1)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", crc)


def test_pixel_budgets_per_image_and_per_request_and_malformed_headers(server):
    reward = Counting()
    s = server(reward, max_image_pixels=64 * 64, max_request_pixels=2 * 64 * 64)
    ok = b64(png_bytes(64, 64))
    status, answer, _ = post(s.url, score_body([ok, ok]))
    assert status == 200 and len(answer["scores"]) == 2
    # per request: the third 64x64 image crosses 8192 pixels
    status, answer, _ = post(s.url, score_body([ok, ok, ok]))
    assert status == 413 and answer["limit"] == "max_request_pixels" and answer["where"] == "media[2]"
    assert "max_request_pixels=8,192" in answer["error"]
    # per image, from a header whose image data does not even exist: nothing is decoded
    status, answer, _ = post(s.url, score_body([ok, b64(_png_header_only(100_000, 100_000))]))
    assert status == 413 and (answer["where"], answer["width"], answer["height"]) == ("media[1]", 100_000, 100_000)
    # malformed headers are 400 and name the entry
    for data, message in [(_png_header_only(8, 8, crc_ok=False), "IHDR checksum"),
                          (_png_header_only(0, 8), "invalid size 0x8"),
                          (b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, "truncated header"),
                          (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IEND" + b"\x00" * 17, "not a 13-byte IHDR"),
                          (b"GIF89a" + b"\x00" * 40, "is a GIF image; only PNG")]:
        status, answer, _ = post(s.url, score_body([ok, b64(data)]))
        assert status == 400 and "media[1]" in answer["error"] and message in answer["error"], answer
    # a header that lies about the data (8x8 header, 64x64 pixels) is refused after decoding starts
    lying = bytearray(png_bytes(64, 64))
    lying[16:24] = struct.pack(">II", 8, 8)
    lying[29:33] = struct.pack(">I", zlib.crc32(bytes(lying[12:29])))
    status, answer, _ = post(s.url, score_body([b64(bytes(lying))]))
    assert status in (200, 400) and (status == 400 or len(answer["scores"]) == 1)  # never a crash
    assert reward.batches == [2] + ([1] if status == 200 else [])


def test_video_frames_count_towards_the_request_budget(server, tmp_path):
    from flowalign.rewards.video import FrameAggregatedReward

    s = server(FrameAggregatedReward.tiny(str(tmp_path)), max_request_pixels=5 * 16 * 16)
    frame = b64(png_bytes(16, 16))
    status, answer, _ = post(s.url, json.dumps({"media": [[frame] * 3, [frame] * 3], "prompts": ["a", "b"]}).encode())
    assert status == 413 and answer["where"] == "media[1][2]" and answer["limit"] == "max_request_pixels"


def test_the_client_splits_batches_to_fit_the_servers_budgets(server):
    reward = Counting()
    s = server(reward, max_request_pixels=3 * 16 * 16)
    media = torch.rand(7, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = RemoteReward(s.url, token=TOKEN, retries=0)(media, ["p"] * 7)
    assert reward.batches == [3, 3, 1]
    assert torch.allclose(out.scores, media.mean(dim=(1, 2, 3)), atol=1 / 255)
    # a body budget: noise PNGs of 32x32 are ~4 KB in base64, so 3 of them do not fit in 10 KB
    reward.batches.clear()
    s = server(reward, max_body_bytes=10_000)
    noisy = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    RemoteReward(s.url, token=TOKEN, retries=0)(noisy, ["p"] * 6)
    assert sum(reward.batches) == 6 and max(reward.batches) <= 2
    # an image over the per-image budget fails in the client, before anything is sent
    reward.batches.clear()
    s = server(reward, max_image_pixels=100)
    with pytest.raises(RemoteRewardError, match=r"16x16 images \(256 pixels\) are over the server's max_image_pixels=100") as err:
        RemoteReward(s.url, token=TOKEN, retries=0)(media, ["p"] * 7)
    assert err.value.status == 413 and reward.batches == []


# ------------------------------------------------------------------------------ body and headers


def test_body_size_is_checked_from_content_length_before_reading(server):
    s = server(max_body_bytes=1000)
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    t0 = time.perf_counter()
    status, answer = raw_exchange(s.url, b"POST /score HTTP/1.0\r\n" + auth + b"Content-Length: 1000000000000\r\n\r\n")
    assert status == 413 and answer["limit"] == "max_body_bytes" and "max_body_bytes=1,000" in answer["error"]
    assert time.perf_counter() - t0 < 5.0  # answered without waiting for the terabyte
    status, answer = raw_exchange(s.url, b"POST /score HTTP/1.0\r\n" + auth + b"\r\n")
    assert status == 411 and "Content-Length" in answer["error"]
    for bad in (b"abc", b"-5", b"1e3", b"\xb2", b"5\r\nContent-Length: 6"):
        status, answer = raw_exchange(s.url, b"POST /score HTTP/1.0\r\n" + auth + b"Content-Length: " + bad + b"\r\n\r\n")
        assert status == 400 and "bad Content-Length" in answer["error"]
    status, answer = raw_exchange(s.url, b"POST /score HTTP/1.1\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert status == 411 and "chunked" in answer["error"]
    # a body shorter than announced: 400 once the client closes its side, not a hang
    host, port = s.url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /score HTTP/1.0\r\n" + auth + b"Content-Length: 500\r\n\r\n{\"media\":")
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert b" 400 " in answer.split(b"\r\n")[0] and b"ended after 9 of 500 bytes" in answer


def test_http_servers_own_errors_are_json(server):
    s = server()
    status, answer = raw_exchange(s.url, b"GARBAGE\r\n\r\n")
    assert status == 400 and "error" in answer
    status, answer = raw_exchange(s.url, b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n")
    assert status == 414 and "error" in answer
    status, answer = raw_exchange(s.url, b"PUT /score HTTP/1.0\r\n\r\n")
    assert status == 501 and "PUT" in answer["error"]


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 50_000, b"[" * 40 + b"]" * 40])
def test_over_deep_json_is_400_not_a_dropped_connection(server, body):
    s = server()
    status, answer, _ = post(s.url, body)
    assert status == 400 and "max_json_depth=32" in answer["error"]
    status, answer, _ = post(s.url, score_body([b64(png_bytes(4, 4))]))  # the server is fine
    assert status == 200


def test_json_depth_counts_brackets_outside_strings_only(server):
    s = server()
    deep_metadata = {"media": [b64(png_bytes(4, 4))], "prompts": ["a"], "metadata": [{}]}
    node = deep_metadata["metadata"][0]
    for _ in range(40):
        node["x"] = {}
        node = node["x"]
    status, answer, _ = post(s.url, json.dumps(deep_metadata).encode())
    assert status == 400 and "max_json_depth" in answer["error"]
    # brackets and escaped quotes inside strings do not count
    prompt = '[{"[' * 500 + '\\"[[' * 100
    status, answer, _ = post(s.url, score_body([b64(png_bytes(4, 4))], prompt=prompt))
    assert status == 200, answer
    assert not json_too_deep(json.dumps({"p": prompt, "m": [[[]]]}).encode(), 4)
    assert json_too_deep(json.dumps({"p": prompt, "m": [[[[]]]]}).encode(), 4)


# ------------------------------------------------------------------------------ connections and admission


def _half_sent(url: str, n: int) -> list[socket.socket]:
    host, port = url.rsplit("/", 1)[1].split(":")
    socks = []
    for _ in range(n):
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(b"POST /score HTTP/1.0\r\nHost: x\r\n")  # the headers never end
        socks.append(sock)
    return socks


def _closed_by_server(sock: socket.socket, wait: float) -> bool:
    """Whether the server closed ``sock`` within ``wait`` s (EOF, possibly after a short error answer)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except socket.timeout:
            return False
        except OSError:
            return True
    return False


def test_half_sent_requests_are_dropped_after_the_timeout_and_threads_stay_bounded(server_process):
    proc, url = server_process(timeout=1.0, max_connections=8, queue_timeout=20.0)
    base = proc_status(proc.pid)["Threads"]
    socks = _half_sent(url, 50)
    try:
        time.sleep(0.5)
        assert proc_status(proc.pid)["Threads"] <= base + 8  # not one thread per connection
        # a normal request is answered (after the idle connections ahead of it time out)
        t0 = time.perf_counter()
        remote = RemoteReward(url, token=TOKEN, retries=2, backoff=0.5, timeout=30)
        assert remote(torch.rand(1, 3, 8, 8), ["a"]).scores.shape == (1,)
        assert time.perf_counter() - t0 < 20.0
        # every half-sent connection is closed: 50 / 8 rounds of the 1 s timeout
        closed = sum(_closed_by_server(sock, wait=15.0) for sock in socks)
        assert closed == 50
        assert proc_status(proc.pid)["Threads"] <= base + 8
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + 10
    while proc_status(proc.pid)["Threads"] > base and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc_status(proc.pid)["Threads"] <= base


def test_idle_connections_do_not_starve_a_normal_request(server):
    s = server(timeout=5.0)  # max_connections 64 by default
    socks = _half_sent(s.url, 50)
    try:
        t0 = time.perf_counter()
        status, answer, _ = post(s.url, score_body([b64(png_bytes(4, 4))]))
        assert status == 200 and time.perf_counter() - t0 < 2.0  # long before the idle ones time out
    finally:
        for sock in socks:
            sock.close()


def test_a_trickled_request_line_does_not_extend_the_deadline(server):
    s = server(timeout=1.0)
    host, port = s.url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        t0 = time.perf_counter()
        closed = False
        for byte in b"POST /score HTTP/1.0\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx":
            try:
                sock.sendall(bytes([byte]))  # one byte every 0.2 s: never idle for the 1 s timeout
            except OSError:
                closed = True
                break
            if _closed_by_server(sock, wait=0.2):
                closed = True
                break
        assert closed and 0.9 < time.perf_counter() - t0 < 3.0


def test_connections_beyond_max_connections_get_503_after_queue_timeout(server):
    s = server(max_connections=2, queue_timeout=0.3, timeout=10.0)
    socks = _half_sent(s.url, 2)
    try:
        time.sleep(0.2)
        t0 = time.perf_counter()
        status, answer, headers = post(s.url, score_body([b64(png_bytes(4, 4))]))
        assert status == 503 and "max_connections=2" in answer["error"] and headers.get("Retry-After") == "1"
        assert 0.25 < time.perf_counter() - t0 < 3.0
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.2)
    assert post(s.url, score_body([b64(png_bytes(4, 4))]))[0] == 200  # slots freed


def test_requests_beyond_max_concurrent_wait_then_get_503_and_the_client_retries(server):
    reward = Counting(seconds=1.5)
    s = server(reward, max_concurrent=1, queue_timeout=0.3)
    body = score_body([b64(png_bytes(4, 4))])
    first = threading.Thread(target=post, args=(s.url, body))
    first.start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    status, answer, headers = post(s.url, body)
    assert status == 503 and "server busy" in answer["error"] and headers.get("Retry-After") == "1"
    assert 0.25 < time.perf_counter() - t0 < 3.0
    # the client treats 503 as retryable
    out = RemoteReward(s.url, token=TOKEN, retries=4, backoff=0.5, timeout=10)(torch.rand(1, 3, 4, 4), ["a"])
    assert out.scores.shape == (1,)
    first.join(timeout=10)
    assert reward.batches == [1, 1]


# ------------------------------------------------------------------------------ token policy


def test_serve_reward_makes_a_random_token_unless_no_auth_is_explicit(server):
    s = server(token=None)
    assert isinstance(s.token, str) and len(s.token) >= 32 and s.token not in repr(s)
    status, answer, _ = post(s.url, score_body([b64(png_bytes(4, 4))]), token=None)
    assert status == 401
    assert server(token=None).token != s.token
    assert post(s.url, score_body([b64(png_bytes(4, 4))]), token=s.token)[0] == 200
    open_server = server(token=None, allow_no_auth=True)
    assert open_server.token is None
    assert post(open_server.url, score_body([b64(png_bytes(4, 4))]), token=None)[0] == 200
    for host in ("0.0.0.0", "", "192.0.2.1", "example.com"):
        with pytest.raises(ConfigError, match="only allowed on a loopback host"):
            serve_reward(Counting(), host=host, allow_no_auth=True)
    with pytest.raises(ConfigError, match="printable ASCII"):
        serve_reward(Counting(), token="has space")
    with pytest.raises(ConfigError, match="max_connections must be a positive int"):
        serve_reward(Counting(), max_connections=0)


def test_is_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "127.3.2.1", "::1", "localhost", "LOCALHOST"]))
    assert not any(map(is_loopback, ["0.0.0.0", "", "::", "10.0.0.1", "example.com", "127.0.0.1.example.com"]))


def _run_bounded(fn, timeout: float):
    """``fn()`` in a daemon thread; its result, or a failure if it does not return in time."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"did not return within {timeout} s"
    return result[0]


@pytest.fixture
def reward_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("_component_: jpeg_compressibility\n")
    return str(path)


def test_cli_refuses_to_serve_without_a_token(reward_yaml, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert _run_bounded(lambda: cli.main(["serve-reward", reward_yaml, "--port", str(free_port())]), 30) == 2
    err = capsys.readouterr().err
    assert err.startswith("flowalign: config error: serve-reward: no bearer token: set $FLOWALIGN_REWARD_TOKEN")
    assert "--no-auth" in err and err.count("\n") <= 2
    # --no-auth is refused off loopback
    argv = ["serve-reward", reward_yaml, "--no-auth", "--host", "0.0.0.0", "--port", str(free_port())]
    assert _run_bounded(lambda: cli.main(argv), 30) == 2
    err = capsys.readouterr().err
    assert "only allowed on a loopback host" in err and "'0.0.0.0'" in err
    # bad limits are one line too
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert _run_bounded(lambda: cli.main(["serve-reward", reward_yaml, "--max-connections", "0"]), 30) == 2
    assert "max_connections must be a positive int" in capsys.readouterr().err


def test_cli_no_auth_serves_on_loopback_with_the_flags_wired(reward_yaml, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    port, stop = free_port(), threading.Event()
    args = cli._parser().parse_args(["serve-reward", reward_yaml, "--no-auth", "--port", str(port), "--timeout", "2",
                                     "--max-image-pixels", "1000", "--max-body-mb", "0.01", "--max-connections", "4"])
    thread = threading.Thread(target=cli._serve_reward, args=(args,), kwargs={"stop": stop}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        remote = RemoteReward(url, token=None, retries=20, backoff=0.05, timeout=10)
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        assert torch.equal(remote(x, ["a", "b"]).scores, JpegCompressibility()(x, ["a", "b"]).scores)
        info = remote.info()
        assert (info["max_image_pixels"], info["max_body_bytes"]) == (1000, int(0.01 * 2**20))
        status, answer, _ = post(url, score_body([b64(png_bytes(40, 40))]), token=None)
        assert status == 413 and "max_image_pixels=1,000" in answer["error"]
        status, answer, _ = post(url, score_body([b64(png_bytes(4, 4))] * 200), token=None)
        assert status == 413 and answer["limit"] == "max_body_bytes"
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_a_flood_of_idle_connections_is_evicted_for_a_real_client(server_process):
    proc, url = server_process(timeout=20.0, max_connections=4)  # idle ones would live 20 s
    base = proc_status(proc.pid)["Threads"]
    socks = _half_sent(url, 20)
    try:
        time.sleep(1.2)
        t0 = time.perf_counter()
        remote = RemoteReward(url, token=TOKEN, retries=0, timeout=30)
        assert remote(torch.rand(1, 3, 8, 8), ["a"]).scores.shape == (1,)
        assert time.perf_counter() - t0 < 8.0  # idle connections made room long before their 20 s timeout
        assert proc_status(proc.pid)["Threads"] <= base + 4
    finally:
        for sock in socks:
            sock.close()


def test_cli_help_states_the_servers_defaults():
    from flowalign.rewards import reward_server as rs

    sub = next(a for a in cli._parser()._actions if a.dest == "command")
    helps = {flag: action.help for action in sub.choices["serve-reward"]._actions for flag in action.option_strings}
    for flag, default in [("--max-body-mb", rs.DEFAULT_MAX_BODY_BYTES // 2**20), ("--max-image-pixels", rs.DEFAULT_MAX_IMAGE_PIXELS),
                          ("--max-request-pixels", rs.DEFAULT_MAX_REQUEST_PIXELS),
                          ("--max-connections", rs.DEFAULT_MAX_CONNECTIONS), ("--max-concurrent", rs.DEFAULT_MAX_CONCURRENT),
                          ("--timeout", int(rs.DEFAULT_TIMEOUT)), ("--queue-timeout", int(rs.DEFAULT_QUEUE_TIMEOUT))]:
        assert f"(default {default}" in helps[flag], flag
