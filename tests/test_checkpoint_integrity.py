"""Checkpoint integrity: sha256 in state.json, damaged checkpoints named and skipped on resume, no
silent restart when none is intact, stale temp files cleaned, write failures that name their cause."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from flowalign.errors import CheckpointError
from flowalign.training import checkpoint as ckpt_mod
from flowalign.training.checkpoint import (
    CheckpointWarning,
    check_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_run_checkpoints,
    resume_training_state,
    save_checkpoint,
    save_training_state,
)

DEAD_PID = 99999999  # above Linux's pid_max (2**22): never a live process


# -------------------------------------------------------------------------------------- helpers


def _model_and_optimizer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def _save_steps(run_dir: str, steps: tuple[int, ...]) -> dict[int, dict[str, torch.Tensor]]:
    """Save a different model at each step (all kept); returns each step's weights."""
    weights = {}
    for step in steps:
        model, opt = _model_and_optimizer(seed=step)
        save_training_state(run_dir, step, model, opt, extra={"step": step}, keep_last=None)
        weights[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return weights


def _folder(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step-{step:06d}")


def _flip_tensor_byte(path: str, offset: int = 5) -> None:
    """Flip one bit of a safetensors file inside the tensor data (after the JSON header)."""
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
    pos = 8 + header_len + offset
    with open(path, "r+b") as fh:
        fh.seek(pos)
        byte = fh.read(1)[0]
        fh.seek(pos)
        fh.write(bytes([byte ^ 0x01]))


def _truncate_half(path: str) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def _snapshot(root: str) -> dict[str, bytes]:
    """Every file under ``root``, relative path -> bytes."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1234)
    model = nn.Linear(4, 3)
    return model, torch.optim.Adam(model.parameters(), lr=0.1)


def _assert_weights(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k


# ------------------------------------------------------------------------------ hashes recorded


def test_state_json_records_sha256_and_size_of_every_file(tmp_path):
    run = str(tmp_path)
    _save_steps(run, (1,))
    folder = _folder(run, 1)
    state = json.loads(open(os.path.join(folder, "state.json")).read())
    assert state["format"] == 2
    assert sorted(state["sha256"]) == sorted(state["bytes"]) == sorted(state["files"]) == [
        "model.safetensors", "optimizer.pt", "rng.pt"]
    for f in state["files"]:
        data = open(os.path.join(folder, f), "rb").read()
        assert state["sha256"][f] == hashlib.sha256(data).hexdigest() and state["bytes"][f] == len(data)
    status = check_checkpoint(folder)
    assert status.intact and status.verified and status.problem is None and status.step == 1


# ------------------------------------------------------------------------ damaged ones are skipped


def test_bit_flip_in_newest_model_is_named_and_the_older_checkpoint_resumed(tmp_path):
    run = str(tmp_path)
    weights = _save_steps(run, (1, 2))
    model_file = os.path.join(_folder(run, 2), "model.safetensors")
    _flip_tensor_byte(model_file)
    # safetensors itself loads the flipped file without complaint: only the hash catches it
    flipped = load_file(model_file)
    assert any(not torch.equal(flipped[k], weights[2][k]) for k in flipped)

    with pytest.warns(CheckpointWarning, match=r"step-000002: model\.safetensors fails its sha256 check"):
        assert latest_checkpoint(run) == _folder(run, 1)
    model, opt = _fresh()
    with pytest.warns(CheckpointWarning, match=r"step-000002: model\.safetensors fails its sha256 check"):
        ckpt = resume_training_state("auto", run, model, opt)
    assert ckpt.path == _folder(run, 1) and ckpt.step == 1 and ckpt.extra == {"step": 1}
    _assert_weights(model, weights[1])
    assert os.path.isdir(_folder(run, 2))  # named and skipped, not deleted


def test_truncated_optimizer_of_newest_checkpoint_is_skipped(tmp_path):
    run = str(tmp_path)
    weights = _save_steps(run, (1, 2))
    _truncate_half(os.path.join(_folder(run, 2), "optimizer.pt"))
    model, opt = _fresh()
    with pytest.warns(CheckpointWarning, match=r"step-000002: optimizer\.pt is truncated \([\d,]+ of [\d,]+ bytes\)"):
        ckpt = resume_training_state("auto", run, model, opt)
    assert ckpt.step == 1
    _assert_weights(model, weights[1])


def _remove_rng(folder: str) -> None:
    os.remove(os.path.join(folder, "rng.pt"))


def _corrupt_state(folder: str) -> None:
    with open(os.path.join(folder, "state.json"), "w") as fh:
        fh.write('{"format": 2, "step": ')


def _remove_state(folder: str) -> None:
    os.remove(os.path.join(folder, "state.json"))


def _wrong_step(folder: str) -> None:
    path = os.path.join(folder, "state.json")
    state = json.loads(open(path).read())
    state["step"] = 7
    with open(path, "w") as fh:
        json.dump(state, fh)


def _grow_model(folder: str) -> None:
    with open(os.path.join(folder, "model.safetensors"), "ab") as fh:
        fh.write(b"\0")


@pytest.mark.parametrize("damage, reason", [
    (_remove_rng, r"missing rng\.pt"),
    (_corrupt_state, r"corrupt state\.json"),
    (_remove_state, r"missing state\.json"),
    (_wrong_step, r"state\.json says step 7"),
    (_grow_model, r"model\.safetensors has [\d,]+ bytes where [\d,]+ were written"),
])
def test_each_kind_of_damage_is_named_and_skipped(tmp_path, damage, reason):
    run = str(tmp_path)
    weights = _save_steps(run, (1, 2))
    damage(_folder(run, 2))
    model, opt = _fresh()
    with pytest.warns(CheckpointWarning, match=f"step-000002: {reason}"):
        assert resume_training_state("auto", run, model, opt).step == 1
    _assert_weights(model, weights[1])


def test_every_checkpoint_broken_raises_naming_each_and_deletes_nothing(tmp_path):
    run = str(tmp_path)
    _save_steps(run, (1, 2, 3))
    os.remove(os.path.join(_folder(run, 1), "model.safetensors"))
    _corrupt_state(_folder(run, 2))
    _flip_tensor_byte(os.path.join(_folder(run, 3), "model.safetensors"))
    before = _snapshot(run)
    model, opt = _fresh()
    untouched = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.warns(CheckpointWarning) as record, pytest.raises(CheckpointError) as info:
        resume_training_state("auto", run, model, opt)
    message = str(info.value)
    assert "none is intact" in message and "nothing was deleted" in message
    assert "step-000001: missing model.safetensors" in message
    assert "step-000002: corrupt state.json" in message
    assert "step-000003: model.safetensors fails its sha256 check" in message
    assert "train.resume=never" in message and "output_dir=" in message
    assert sorted(str(w.message).split(":")[0].rsplit("-", 1)[-1] for w in record) == ["000001", "000002", "000003"]
    assert _snapshot(run) == before
    _assert_weights(model, untouched)
    with pytest.warns(CheckpointWarning):
        assert latest_checkpoint(run) is None
    assert [(s.step, s.intact) for s in list_checkpoints(run)] == [(1, False), (2, False), (3, False)]


def test_explicit_checkpoint_that_fails_its_check_raises_naming_it(tmp_path):
    run = str(tmp_path)
    _save_steps(run, (1, 2))
    bad = _folder(run, 2)
    _flip_tensor_byte(os.path.join(bad, "model.safetensors"))
    model, opt = _fresh()
    with pytest.raises(CheckpointError, match=rf"cannot resume from {bad} \(train.resume\): model\.safetensors "
                                              r"fails its sha256 check"):
        resume_training_state(bad, run, model, opt)
    missing = os.path.join(run, "checkpoints", "step-000009")
    with pytest.raises(CheckpointError, match=rf"cannot resume from {missing} .*does not exist"):
        resume_training_state(missing, run, model, opt)
    assert resume_training_state(_folder(run, 1), run, model, opt).step == 1


def test_no_checkpoint_folders_resumes_nothing_without_warning_and_cleans_temp(tmp_path):
    model, opt = _fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resume_training_state("auto", str(tmp_path), model, opt) is None
        stale = tmp_path / "checkpoints" / f".tmp-step-000001-{DEAD_PID}"  # a writer killed before step 1
        os.makedirs(stale)
        assert latest_checkpoint(str(tmp_path)) is None
        assert resume_training_state("auto", str(tmp_path), model, opt) is None
    assert not stale.exists()


# ------------------------------------------------------------------------------- format 1


def _as_format_1(folder: str) -> None:
    """Rewrite ``state.json`` the way flowalign wrote it before hashes (format 1)."""
    path = os.path.join(folder, "state.json")
    state = json.loads(open(path).read())
    old = {"format": 1, "step": state["step"], "files": state["files"], "extra": state["extra"]}
    with open(path, "w") as fh:
        fh.write(json.dumps(old, indent=2, sort_keys=True))


def test_format_1_checkpoint_without_hashes_still_loads(tmp_path):
    run = str(tmp_path)
    weights = _save_steps(run, (1, 2))
    _as_format_1(_folder(run, 2))
    status = check_checkpoint(_folder(run, 2))
    assert status.intact and not status.verified and status.step == 2
    model, opt = _fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # accepted as it is: no warning
        assert latest_checkpoint(run) == _folder(run, 2)
        ckpt = resume_training_state("auto", run, model, opt)
    assert ckpt.step == 2 and ckpt.extra == {"step": 2}
    _assert_weights(model, weights[2])
    # a format-1 folder that lost a file is still refused
    os.remove(os.path.join(_folder(run, 2), "optimizer.pt"))
    with pytest.warns(CheckpointWarning, match=r"step-000002: missing optimizer\.pt"):
        assert resume_training_state("auto", run, *_fresh()).step == 1


def test_unknown_format_is_named(tmp_path):
    run = str(tmp_path)
    _save_steps(run, (1,))
    path = os.path.join(_folder(run, 1), "state.json")
    state = json.loads(open(path).read())
    state["format"] = 4
    with open(path, "w") as fh:
        json.dump(state, fh)
    with pytest.raises(CheckpointError, match=r"unsupported format 4 \(this flowalign reads formats 1, 2, 3"):
        load_checkpoint(_folder(run, 1))


def test_a_sharded_state_json_lists_only_shard_files_and_its_world_size(tmp_path):
    """Format 3 (per-rank shards, tests/test_fsdp.py writes real ones): the files must lie in shards/ (no
    escaping it) or be rng.pt, DCP's .metadata must be listed, and the world size recorded."""
    run = str(tmp_path)
    _save_steps(run, (1,))
    folder = _folder(run, 1)
    path = os.path.join(folder, "state.json")
    full = json.loads(open(path).read())
    os.makedirs(os.path.join(folder, "shards"))
    for name in (".metadata", "__0_0.distcp"):
        with open(os.path.join(folder, "shards", name), "wb") as fh:
            fh.write(b"x")
    files = ["shards/.metadata", "shards/__0_0.distcp", "rng.pt"]
    sharded = {**full, "format": 3, "files": files,
               "sha256": {**full["sha256"], **{f: hashlib.sha256(b"x").hexdigest() for f in files[:2]}},
               "bytes": {**full["bytes"], **{f: 1 for f in files[:2]}},
               "sharded": {"world_size": 2, "parts": ["model", "optimizer"]}}
    cases = [({}, None),
             ({"files": [*files, "model.safetensors"]}, r"unknown files \['model.safetensors'\]"),
             ({"files": [*files, "shards/../model.safetensors"]}, "unknown files"),
             ({"files": files[1:]}, "does not list shards/.metadata"),
             ({"sharded": {"world_size": 0, "parts": ["model", "optimizer"]}}, "'sharded' must hold a world_size"),
             ({"sharded": None}, "'sharded' must hold")]
    for change, problem in cases:
        with open(path, "w") as fh:
            json.dump({**sharded, **change}, fh)
        status = check_checkpoint(folder)
        assert status.intact == (problem is None), (change, status)
        if problem:
            assert re.search(problem, status.problem), (change, status.problem)
    with open(path, "w") as fh:
        json.dump(sharded, fh)
    with pytest.raises(CheckpointError, match=r"shards of 2 process\(es\).*train.fsdp.enabled=true.*dcp_to_torch_save"):
        load_checkpoint(folder)


# ------------------------------------------------------------------------------ stale temp files


def _make_stale_entries(run: str) -> dict[str, str]:
    """A dead writer's temp folder and latest temp file, this process's old leftover, and a temp
    folder of a live process (the parent of this one), which must be kept."""
    root = os.path.join(run, "checkpoints")
    paths = {
        "dead_tmp": os.path.join(root, f".tmp-step-000003-{DEAD_PID}"),
        "own_tmp": os.path.join(root, f".tmp-step-000008-{os.getpid()}"),
        "dead_old": os.path.join(root, f".old-step-000001-{DEAD_PID}"),
        "live_tmp": os.path.join(root, f".tmp-step-000004-{os.getppid()}"),
    }
    for path in paths.values():
        os.makedirs(path)
        with open(os.path.join(path, "model.safetensors"), "wb") as fh:
            fh.write(b"partial")
    paths["dead_latest"] = os.path.join(root, f"latest.tmp-{DEAD_PID}")
    with open(paths["dead_latest"], "w") as fh:
        fh.write("step-000003\n")
    return paths


def test_stale_temp_folders_are_removed_by_the_next_save(tmp_path):
    run = str(tmp_path)
    _save_steps(run, (1,))
    paths = _make_stale_entries(run)
    _save_steps(run, (2,))
    assert not any(os.path.exists(paths[k]) for k in ("dead_tmp", "own_tmp", "dead_old", "dead_latest"))
    assert os.path.isdir(paths["live_tmp"])  # its writer may still be running
    assert load_checkpoint(_folder(run, 1)).step == 1  # the existing step-000001 was kept, not replaced


def test_stale_temp_folders_are_removed_on_resume(tmp_path):
    run = str(tmp_path)
    weights = _save_steps(run, (1,))
    paths = _make_stale_entries(run)
    model, opt = _fresh()
    assert resume_training_state("auto", run, model, opt).step == 1
    _assert_weights(model, weights[1])
    assert not any(os.path.exists(paths[k]) for k in ("dead_tmp", "own_tmp", "dead_old", "dead_latest"))
    assert os.path.isdir(paths["live_tmp"])
    # resume="never" reads nothing and touches nothing
    stale = os.path.join(run, "checkpoints", f".tmp-step-000005-{DEAD_PID}")
    os.makedirs(stale)
    assert resume_training_state("never", run, model, opt) is None
    assert os.path.isdir(stale)


def test_moved_aside_checkpoint_of_a_killed_resave_is_put_back(tmp_path):
    """A kill between "move the old step-N aside" and "rename the new one in" leaves only
    ``.old-step-N-<pid>``: resuming puts it back instead of deleting the only copy."""
    run = str(tmp_path)
    weights = _save_steps(run, (1, 5))
    root = os.path.join(run, "checkpoints")
    os.replace(_folder(run, 5), os.path.join(root, f".old-step-000005-{DEAD_PID}"))
    model, opt = _fresh()
    assert resume_training_state("auto", run, model, opt).step == 5
    _assert_weights(model, weights[5])
    assert sorted(os.listdir(root)) == ["latest", "step-000001", "step-000005"]


# ------------------------------------------------------------------------------- write failures


def _fail_writing(monkeypatch, fname: str, err: OSError) -> None:
    """Make the low-level write of ``fname`` (inside the temp folder) fail with ``err``."""
    real = ckpt_mod._write_chunk

    def failing(fh, data):
        if os.path.basename(fh.name) == fname:
            real(fh, bytes(data)[:3])
            raise err
        real(fh, data)

    monkeypatch.setattr(ckpt_mod, "_write_chunk", failing)


def _assert_previous_intact(run: str, weights: dict[str, torch.Tensor]) -> None:
    root = os.path.join(run, "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", "step-000001"]  # no temp folder, no step-000002
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latest_checkpoint(run) == _folder(run, 1)
    model, opt = _fresh()
    assert resume_training_state("auto", run, model, opt).step == 1
    _assert_weights(model, weights)


@pytest.mark.parametrize("fname", ["model.safetensors", "optimizer.pt", "rng.pt", "state.json"])
def test_disk_full_is_named_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fname):
    run = str(tmp_path)
    weights = _save_steps(run, (1,))
    _fail_writing(monkeypatch, fname, OSError(errno.ENOSPC, "No space left on device"))
    model, opt = _model_and_optimizer(seed=2)
    with pytest.raises(CheckpointError, match=r"disk full while writing checkpoint \S+step-000002 "
                                              r"\([\d,]+ bytes free on /\S*\)") as info:
        save_training_state(run, 2, model, opt, extra={"step": 2})
    # torch.save reports a failed write as a RuntimeError; the OSError behind it is what is chained
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    monkeypatch.undo()
    _assert_previous_intact(run, weights[1])


def test_disk_full_while_resaving_a_step_puts_the_old_one_back(tmp_path, monkeypatch):
    run = str(tmp_path)
    weights = _save_steps(run, (1,))
    _fail_writing(monkeypatch, "state.json", OSError(errno.ENOSPC, "No space left on device"))
    model, opt = _model_and_optimizer(seed=9)
    with pytest.raises(CheckpointError, match="disk full"):
        save_training_state(run, 1, model, opt, extra={"step": 1})
    monkeypatch.undo()
    _assert_previous_intact(run, weights[1])


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EROFS])
def test_permission_error_is_named(tmp_path, monkeypatch, code):
    run = str(tmp_path)
    weights = _save_steps(run, (1,))
    _fail_writing(monkeypatch, "model.safetensors", PermissionError(code, os.strerror(code)))
    model, opt = _model_and_optimizer(seed=2)
    with pytest.raises(CheckpointError, match=r"no permission to write \S+/\.tmp-step-000002-\d+/model\.safetensors "
                                              r"\(.+\) while saving checkpoint \S+step-000002"):
        save_training_state(run, 2, model, opt)
    monkeypatch.undo()
    _assert_previous_intact(run, weights[1])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="chmod does not stop root (or non-POSIX)")
def test_read_only_checkpoints_folder_is_named(tmp_path):
    run = str(tmp_path)
    weights = _save_steps(run, (1,))
    root = os.path.join(run, "checkpoints")
    os.chmod(root, 0o555)
    try:
        model, opt = _model_and_optimizer(seed=2)
        with pytest.raises(CheckpointError, match=r"no permission to write \S+checkpoints"):
            save_training_state(run, 2, model, opt)
    finally:
        os.chmod(root, 0o755)
    _assert_previous_intact(run, weights[1])


def test_other_write_error_names_path_and_cause(tmp_path, monkeypatch):
    run = str(tmp_path)
    weights = _save_steps(run, (1,))
    _fail_writing(monkeypatch, "optimizer.pt", OSError(errno.EIO, os.strerror(errno.EIO)))
    model, opt = _model_and_optimizer(seed=2)
    with pytest.raises(CheckpointError, match=rf"cannot write checkpoint \S+step-000002: "
                                              rf"\S+optimizer\.pt: {os.strerror(errno.EIO)}"):
        save_training_state(run, 2, model, opt)
    monkeypatch.undo()
    _assert_previous_intact(run, weights[1])


# ------------------------------------------------------------------------------ list / remove


def test_list_checkpoints_reports_each_folder(tmp_path):
    run = str(tmp_path)
    assert list_checkpoints(run) == []
    _save_steps(run, (1, 2, 3))
    _flip_tensor_byte(os.path.join(_folder(run, 2), "model.safetensors"))
    _remove_state(_folder(run, 3))
    os.makedirs(os.path.join(run, "checkpoints", f".tmp-step-000004-{DEAD_PID}"))  # not a checkpoint
    statuses = list_checkpoints(run)
    assert [(s.path, s.step, s.intact, s.verified) for s in statuses] == [
        (_folder(run, 1), 1, True, True), (_folder(run, 2), 2, False, False), (_folder(run, 3), 3, False, False)]
    assert statuses[0].problem is None
    assert "model.safetensors fails its sha256 check" in statuses[1].problem
    assert "missing state.json" in statuses[2].problem
    # without reading the files only structure and sizes are checked: the bit flip goes unseen
    assert [(s.intact, s.verified) for s in list_checkpoints(run, verify=False)] == [
        (True, False), (True, False), (False, False)]


def test_remove_run_checkpoints_removes_them_all_and_keeps_user_files(tmp_path):
    run = str(tmp_path)
    _save_steps(run, (1, 2))
    root = os.path.join(run, "checkpoints")
    os.makedirs(os.path.join(root, f".tmp-step-000003-{DEAD_PID}"))
    open(os.path.join(root, f"latest.tmp-{DEAD_PID}"), "w").close()
    with open(os.path.join(run, "metrics.jsonl"), "w") as fh:
        fh.write("{}\n")
    assert remove_run_checkpoints(run) == [f".tmp-step-000003-{DEAD_PID}", "latest", f"latest.tmp-{DEAD_PID}",
                                           "step-000001", "step-000002"]
    assert not os.path.exists(root) and os.path.exists(os.path.join(run, "metrics.jsonl"))
    assert remove_run_checkpoints(run) == []
    assert resume_training_state("auto", run, *_fresh()) is None
    # a file the user keeps in the folder stays, and so does the folder
    _save_steps(run, (1,))
    with open(os.path.join(root, "NOTES.txt"), "w") as fh:
        fh.write("mine")
    assert remove_run_checkpoints(run) == ["latest", "step-000001"]
    assert os.listdir(root) == ["NOTES.txt"]


def test_save_checkpoint_still_round_trips_every_dtype(tmp_path):
    tensors = {"f32": torch.randn(3, 2), "bf16": torch.randn(4).to(torch.bfloat16), "i64": torch.arange(5),
               "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5)}
    path = save_checkpoint(str(tmp_path), 1, model_state=tensors, ema_state={"e": torch.ones(2)},
                           optimizer_state={"state": {}, "param_groups": []}, rng_state={"seed": 3})
    assert check_checkpoint(path).verified  # every file, written through flowalign's own writer, hashed
    ck = load_checkpoint(path)
    assert all(torch.equal(ck.model_state[k], v) and ck.model_state[k].dtype == v.dtype for k, v in tensors.items())
    assert torch.equal(ck.ema_state["e"], torch.ones(2)) and ck.rng_state == {"seed": 3}
    assert ck.optimizer_state == {"state": {}, "param_groups": []}
