"""The remote reward server / client on loopback: results equal the in-process reward (images,
video, batching, components, validity, metadata), auth (401; a server started without a token makes
a random one), malformed payloads (400), oversized batches (413), reward failures (500), dead and
slow servers (bounded retries, timeouts), and a
training run whose reward server dies mid-run: a clear error, the last checkpoint intact, and a
resume that reproduces the uninterrupted run."""

from __future__ import annotations

import ast
import base64
import io
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import flowalign
from flowalign.errors import RunDirError
from flowalign.rewards import RewardOutput, build_reward
from flowalign.rewards.jpeg import JpegCompressibility
from flowalign.rewards.remote import (
    TOKEN_ENV,
    RemoteReward,
    RemoteRewardError,
    RemoteRewardTimeout,
    VideoAlignReward,
    decode_media,
    encode_media,
    serve_from_config,
    serve_reward,
)
from flowalign.rewards.video import FrameAggregatedReward
from flowalign.training.checkpoint import latest_checkpoint, load_checkpoint


def grid_media(*shape: int, seed: int = 0) -> torch.Tensor:
    """Media on the uint8 grid, so PNG transport is exact."""
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed)).float() / 255.0


class Stats:
    """A reward with components, a validity mask and a metadata-dependent term."""

    name, modality = "stats", "image"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, media, prompts, metadata=None):
        self.calls += 1
        bonus = torch.tensor([float((m or {}).get("bonus", 0.0)) for m in metadata] if metadata else [0.0] * len(media))
        mean = media.mean(dim=(1, 2, 3))
        length = torch.tensor([float(len(p)) for p in prompts])
        return RewardOutput(scores=mean + bonus + 0.01 * length, components={"red": media[:, 0].mean(dim=(1, 2))},
                            valid=mean > 0.5)


class Failing:
    name, modality = "failing", "image"

    def __call__(self, media, prompts, metadata=None):
        raise RuntimeError("model exploded on purpose")


class Sleepy:
    name, modality = "sleepy", "image"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, media, prompts, metadata=None):
        time.sleep(self.seconds)
        return media.mean(dim=(1, 2, 3))


@pytest.fixture
def server():
    servers = []

    def start(reward, **kwargs):
        s = serve_reward(reward, **kwargs)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_post(url: str, body: bytes, token: str | None = None) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url + "/score", data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


# ------------------------------------------------------------------------------ equality with in-process


def test_media_codec_round_trip_is_exact_on_the_uint8_grid():
    images = grid_media(3, 3, 5, 7)
    assert torch.equal(decode_media(encode_media(images, "image"), "image"), images)
    video = grid_media(2, 4, 3, 6, 5, seed=1)
    encoded = encode_media(video, "video")
    assert len(encoded) == 2 and all(len(v) == 4 for v in encoded)
    assert torch.equal(decode_media(encoded, "video"), video)
    # off-grid media are quantized like _media.to_uint8: within half a level
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    assert (decode_media(encode_media(x, "image"), "image") - x).abs().max() <= 0.5 / 255 + 1e-7


def test_remote_equals_in_process_with_batching_components_validity_and_metadata(server):
    local, served = Stats(), Stats()
    s = server(served, max_batch=3)
    assert s.host == "127.0.0.1" and s.port > 0  # loopback by default, a real port when 0 was asked for
    remote = RemoteReward(s.url, token=s.token)
    media = grid_media(7, 3, 8, 8)
    prompts = [f"prompt {'x' * i}" for i in range(7)]
    metadata = [{"bonus": i / 10} for i in range(7)]
    expected, got = local(media, prompts, metadata), remote(media, prompts, metadata)
    assert (remote.name, remote.modality) == ("stats", "image")
    assert served.calls == 3  # 7 samples in batches of at most 3
    assert got.scores.dtype == torch.float32 and got.scores.shape == (7,)
    assert torch.equal(got.scores, expected.scores)
    assert got.components.keys() == {"red"} and torch.equal(got.components["red"], expected.components["red"])
    assert torch.equal(got.valid, expected.valid) and 0 < int(got.valid.sum()) < 7


def test_remote_jpeg_and_video_rewards_equal_in_process(server, tmp_path):
    s = server(JpegCompressibility())
    jpeg = RemoteReward(s.url, token=s.token)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))  # off-grid: JPEG quantizes the same way
    assert torch.equal(jpeg(x, ["a"] * 4).scores, JpegCompressibility()(x, ["a"] * 4).scores)

    video_reward = FrameAggregatedReward.tiny(str(tmp_path))
    s = server(video_reward, max_batch=2)
    remote = RemoteReward(s.url, token=s.token)
    video = grid_media(3, 5, 3, 16, 16, seed=4)
    a, b = remote(video, ["v"] * 3), video_reward(video, ["v"] * 3)
    assert remote.modality == "video"
    assert torch.equal(a.scores, b.scores) and a.components.keys() == b.components.keys()
    # VideoAlignReward is a RemoteReward that insists on a video server
    va = VideoAlignReward(remote.url, token=remote.token, retries=0)
    assert va.name == "videoalign" and torch.equal(va(video, ["v"] * 3).scores, b.scores)
    with pytest.raises(RemoteRewardError, match="modality 'image', expected 'video'"):
        VideoAlignReward(jpeg.url, token=jpeg.token, retries=0)(video, ["v"] * 3)


def test_tiny_builders_own_a_loopback_server(tmp_path):
    for cls, media in ((RemoteReward, grid_media(3, 3, 8, 8)), (VideoAlignReward, grid_media(3, 4, 3, 8, 8))):
        reward = cls.tiny(str(tmp_path))
        try:
            out = reward(media, ["a", "b", "c"])
            assert out.scores.shape == (3,) and out.scores.dtype == torch.float32
            one_by_one = torch.cat([reward(media[i:i + 1], ["abc"[i]]).scores for i in range(3)])
            assert torch.equal(one_by_one, out.scores)
        finally:
            reward.close()
        with pytest.raises(RemoteRewardError, match="Connection refused"):
            cls(reward.url, retries=0)(media, ["a", "b", "c"])  # closed with its client


def test_build_reward_accepts_the_remote_reward_and_the_registry_spec(server):
    s = server(JpegCompressibility())
    reward = build_reward({"_component_": "flowalign.rewards.remote:RemoteReward", "url": s.url, "token": s.token,
                           "name": "remote_jpeg"})
    assert reward.name == "remote_jpeg" and reward.modality == "image"


# ------------------------------------------------------------------------------ auth and bad requests


def test_wrong_or_missing_token_is_401_and_not_retried(server, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    s = server(Stats(), token="s3cret")
    media = grid_media(2, 3, 4, 4)
    for token in (None, "wrong"):
        t0 = time.perf_counter()
        with pytest.raises(RemoteRewardError, match="401") as err:
            RemoteReward(s.url, token=token, retries=3, backoff=5.0)(media, ["a", "b"])
        assert err.value.status == 401 and time.perf_counter() - t0 < 2.0  # no 5 s backoff: not retried
    status, body, headers = raw_post(s.url, b"{}")
    assert status == 401 and "bearer token" in body["error"] and headers.get("WWW-Authenticate", "").startswith("Bearer")
    ok = RemoteReward(s.url, token="s3cret")(media, ["a", "b"])
    assert torch.equal(ok.scores, Stats()(media, ["a", "b"]).scores)
    monkeypatch.setenv(TOKEN_ENV, "s3cret")  # the token may come from the environment
    assert torch.equal(RemoteReward(s.url)(media, ["a", "b"]).scores, ok.scores)


def _png_b64(size=(4, 4), fmt="PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("body, message", [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"prompts": ["a"]}).encode(), "missing ['media']"),
    (json.dumps({"media": [], "prompts": [], "extra": 1}).encode(), "unknown ['extra']"),
    (json.dumps({"media": ["@@@"], "prompts": ["a"]}).encode(), "media[0] is not valid base64"),
    (json.dumps({"media": [_png_b64(fmt="JPEG")], "prompts": ["a"]}).encode(), "only PNG"),
    (json.dumps({"media": [base64.b64encode(b"garbage").decode()], "prompts": ["a"]}).encode(), "media[0] is not a readable PNG"),
    (json.dumps({"media": [_png_b64()], "prompts": ["a", "b"]}).encode(), "one entry per prompt"),
    (json.dumps({"media": [_png_b64()], "prompts": [3]}).encode(), "'prompts' must be a list of strings"),
    (json.dumps({"media": [_png_b64()], "prompts": ["a"], "metadata": [1]}).encode(), "'metadata'"),
    (json.dumps({"media": [_png_b64(), _png_b64((5, 4))], "prompts": ["a", "b"]}).encode(), "different sizes"),
])
def test_malformed_payload_is_400_with_a_message(server, body, message):
    s = server(Stats())
    status, answer, _ = raw_post(s.url, body, token=s.token)
    assert status == 400, answer
    assert message in answer["error"]
    # the server survives and still scores
    status, answer, _ = raw_post(s.url, json.dumps({"media": [_png_b64()], "prompts": ["a"]}).encode(), token=s.token)
    assert status == 200 and len(answer["scores"]) == 1


def test_video_payload_errors_name_the_frame(server, tmp_path):
    s = server(FrameAggregatedReward.tiny(str(tmp_path)))
    status, answer, _ = raw_post(s.url, json.dumps({"media": [[_png_b64(), "%%"]], "prompts": ["a"]}).encode(), token=s.token)
    assert status == 400 and "media[0][1]" in answer["error"]
    status, answer, _ = raw_post(s.url, json.dumps({"media": [_png_b64()], "prompts": ["a"]}).encode(), token=s.token)
    assert status == 400 and "media[0] must be a non-empty list" in answer["error"]


def test_oversized_batch_is_413_and_reward_errors_are_500(server):
    s = server(Stats(), max_batch=2)
    status, answer, _ = raw_post(s.url, json.dumps({"media": [_png_b64()] * 3, "prompts": ["a"] * 3}).encode(), token=s.token)
    assert status == 413 and "max_batch=2" in answer["error"] and answer["limit"] == "max_batch"
    failing = server(Failing())
    with pytest.raises(RemoteRewardError, match="HTTP 500.*RuntimeError: model exploded on purpose") as err:
        RemoteReward(failing.url, token=failing.token, retries=0)(grid_media(1, 3, 4, 4), ["a"])
    assert err.value.status == 500


# ------------------------------------------------------------------------------ dead and slow servers


def test_dead_server_fails_after_the_configured_retries_within_bounded_time():
    url = f"http://127.0.0.1:{free_port()}"
    reward = RemoteReward(url, retries=2, backoff=0.2, timeout=2.0)  # building it touches no network
    t0 = time.perf_counter()
    with pytest.raises(RemoteRewardError, match=r"failed after 3 attempt\(s\).*Connection refused") as err:
        reward(grid_media(1, 3, 4, 4), ["a"])
    elapsed = time.perf_counter() - t0
    assert not isinstance(err.value, RemoteRewardTimeout)
    assert 0.2 + 0.4 <= elapsed < 3.0  # both backoffs were waited, and nothing more


def test_a_server_that_comes_up_during_the_retries_is_reached():
    port = free_port()
    started = []
    timer = threading.Timer(0.3, lambda: started.append(serve_reward(Stats(), port=port, token="late")))
    timer.start()
    try:
        out = RemoteReward(f"http://127.0.0.1:{port}", token="late", retries=6, backoff=0.1)(grid_media(2, 3, 4, 4), ["a", "b"])
        assert out.scores.shape == (2,)
    finally:
        timer.join()
        for s in started:
            s.shutdown()


def test_slow_server_raises_a_timeout_error_after_retries(server):
    s = server(Sleepy(1.5))
    reward = RemoteReward(s.url, token=s.token, timeout=0.3, retries=1, backoff=0.0, name="sleepy", modality="image")
    t0 = time.perf_counter()
    with pytest.raises(RemoteRewardTimeout, match=r"failed after 2 attempt\(s\) \(timeout 0.3s"):
        reward(grid_media(1, 3, 4, 4), ["a"])
    assert 0.6 <= time.perf_counter() - t0 < 1.5


def test_client_arguments_are_validated():
    for kwargs, name in [({"url": "localhost:80"}, "url"), ({"timeout": 0}, "timeout"), ({"retries": -1}, "retries"),
                         ({"retries": 1.5}, "retries"), ({"backoff": -1}, "backoff"), ({"modality": "audio"}, "modality")]:
        with pytest.raises(ValueError, match=name):
            RemoteReward(**{"url": "http://127.0.0.1:1", **kwargs})
    with pytest.raises(ValueError, match="modality 'text'"):
        serve_reward(type("T", (), {"name": "t", "modality": "text", "__call__": lambda *a: None})())


def test_serve_from_config_reads_a_yaml_spec_and_an_env_token(tmp_path, monkeypatch):
    config = tmp_path / "reward.yaml"
    config.write_text("_component_: jpeg_compressibility\nquality: 80\n")
    monkeypatch.setenv(TOKEN_ENV, "envtoken")
    port, stop = free_port(), threading.Event()
    thread = threading.Thread(target=serve_from_config, args=(str(config),), kwargs={"port": port, "stop": stop})
    thread.start()
    try:
        reward = RemoteReward(f"http://127.0.0.1:{port}", retries=10, backoff=0.05)  # token from the env
        x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
        assert torch.equal(reward(x, ["a", "b"]).scores, JpegCompressibility(quality=80)(x, ["a", "b"]).scores)
        with pytest.raises(RemoteRewardError, match="401"):
            RemoteReward(reward.url, token="other", retries=0)(x, ["a", "b"])
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        serve_from_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("module", ["remote", "reward_server", "_remote_protocol"])
def test_remote_modules_never_use_pickle(module):
    import importlib

    path = importlib.import_module(f"flowalign.rewards.{module}").__file__
    tree = ast.parse(open(path).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {"pickle", "cPickle", "dill", "marshal"} & imported
    assert "torch.load" not in open(path).read()


# ------------------------------------------------------------------------------ training state


class _DiesAfter(JpegCompressibility):
    """Served JPEG reward whose server goes away right after answering call ``n``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls, self.server = n, 0, None

    def __call__(self, media, prompts, metadata=None):
        self.calls += 1
        if self.calls == self.n:
            self.server.shutdown()  # listening socket closed; this request is still answered
        return super().__call__(media, prompts, metadata)


def _ckpt_bytes(path: str) -> dict[str, bytes]:
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


def _fail_with_dying_server(cfg: dict) -> str:
    """Train ``cfg`` (2 iterations, checkpoint every 1) against a served JPEG reward whose server dies
    after iteration 1; returns the latest checkpoint folder after checking the failure is clean."""
    dying = _DiesAfter(n=2)  # calls: eval@0, iteration 1 (then the checkpoint at 1), iteration 2 -> dead
    dying.server = serve_reward(dying)
    remote = RemoteReward(dying.server.url, token=dying.server.token, retries=1, backoff=0.05, timeout=5.0)
    with pytest.raises(RemoteRewardError, match=r"failed after 2 attempt\(s\).*Connection refused"):
        flowalign.train(cfg, rewards=remote)
    ckpt_dir = os.path.join(cfg["output_dir"], "checkpoints")
    assert sorted(os.listdir(ckpt_dir)) == ["latest", "step-000001"]  # no half-written step 2
    latest = latest_checkpoint(cfg["output_dir"])
    assert latest.endswith("step-000001") and load_checkpoint(latest).step == 1
    return latest


def test_training_with_a_dying_reward_server_fails_clearly_and_keeps_the_checkpoint(tiny_config):
    tiny_config["train"].update(iterations=2, checkpoint_every=1)
    latest = _fail_with_dying_server(tiny_config)
    saved = _ckpt_bytes(latest)
    # the literal dead-URL client fails too (at setup, when its name is first needed) and touches nothing
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RemoteRewardError, match="Connection refused"):
        flowalign.train(tiny_config, rewards=RemoteReward(dead, retries=1, backoff=0.05))
    assert _ckpt_bytes(latest) == saved and latest_checkpoint(tiny_config["output_dir"]) == latest


@pytest.mark.slow
def test_resume_after_a_dead_reward_server_reproduces_the_uninterrupted_run(tiny_config, tmp_path):
    tiny_config["train"].update(iterations=2, checkpoint_every=1)
    straight = dict(tiny_config, output_dir=str(tmp_path / "straight"))
    flowalign.train(straight)  # in-process jpeg_compressibility, never interrupted
    run = dict(tiny_config, output_dir=str(tmp_path / "remote"))
    latest = _fail_with_dying_server(run)
    with pytest.raises(RunDirError, match="rewards: 'python:flowalign.rewards.remote.RemoteReward' in the run"):
        flowalign.train(run)  # another reward: refused unless the checkpoint is named
    flowalign.train(run, {"train.resume": latest})  # resume from step 1 with the in-process reward
    a = load_file(os.path.join(straight["output_dir"], "final", "unet", "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(run["output_dir"], "final", "unet", "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
