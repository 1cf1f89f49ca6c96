"""Saving never loses what was there: a transcoder directory is replaced as a whole, an
interrupted save leaves the old transcoder loadable and no temporary file behind,
damaged weights are caught by their checksum, and bad weights are never written."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tl_transcoders import Transcoder, TranscoderConfig, TranscoderFileError
from tl_transcoders.core import native
from tl_transcoders.core.files import OutputPathError, atomic_directory, atomic_write, check_writable_directory


def transcoder(seed: int, activation: str = "topk") -> Transcoder:
    torch.manual_seed(seed)
    cfg = TranscoderConfig(d_in=12, d_out=10, d_latent=40, layer=1, activation=activation, k=5, skip=True)
    t = Transcoder(cfg)
    with torch.no_grad():
        t.W_skip.normal_()
        t.b_enc.normal_()
    return t.eval()


def same_weights(a: Transcoder, b: Transcoder) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def leftovers(directory):
    return sorted(p.name for p in directory.parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError])
def test_an_interrupted_save_leaves_the_old_transcoder_loadable(tmp_path, monkeypatch, interruption):
    target = tmp_path / "layer_1"
    old, new = transcoder(0), transcoder(1)
    old.save(target)
    real_save = native.save_file

    def weights_then_interrupt(tensors, path, *args, **kwargs):
        real_save(tensors, path, *args, **kwargs)  # the new weights are on disk ...
        raise interruption("interrupted")  # ... and the save stops before the config

    monkeypatch.setattr(native, "save_file", weights_then_interrupt)
    with pytest.raises((interruption, TranscoderFileError)):
        new.save(target)
    assert same_weights(Transcoder.load(target), old)
    assert leftovers(target) == [], "no temporary file or directory is left behind"


def test_an_interrupt_after_both_files_are_written_also_keeps_the_old_one(tmp_path, monkeypatch):
    """The replacement itself is the last step: stopping right before it keeps the old."""
    target = tmp_path / "layer_1"
    old = transcoder(0)
    old.save(target)
    monkeypatch.setattr(
        "tl_transcoders.core.files._move_into_place", lambda new, path: os.kill(os.getpid(), signal.SIGINT)
    )
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises, even under nohup
    try:
        with pytest.raises(KeyboardInterrupt):
            transcoder(1).save(target)
    finally:
        signal.signal(signal.SIGINT, before)
    assert same_weights(Transcoder.load(target), old)
    assert leftovers(target) == []


def test_saving_over_a_transcoder_replaces_it_whole(tmp_path):
    target = tmp_path / "layer_1"
    transcoder(0, "jumprelu").save(target)
    transcoder(1, "topk").save(target)
    loaded = Transcoder.load(target)
    assert loaded.cfg.activation == "topk" and same_weights(loaded, transcoder(1))
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "transcoder.safetensors"]


def test_save_refuses_non_finite_weights_and_writes_nothing(tmp_path):
    bad = transcoder(0)
    with torch.no_grad():
        bad.W_dec[0, 0] = float("nan")
    with pytest.raises(TranscoderFileError, match=r"\['W_dec'\] hold NaN or inf.*nothing was written"):
        bad.save(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_save_refuses_a_directory_holding_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TranscoderFileError, match=r"holds other files \(notes.txt\)"):
        transcoder(0).save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_save_refuses_a_file_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TranscoderFileError, match="is a file"):
        transcoder(0).save(tmp_path / "file")


def test_flipped_bytes_in_the_weights_are_caught_by_the_checksum(tmp_path):
    transcoder(0).save(tmp_path)
    path = tmp_path / "transcoder.safetensors"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01  # inside the last tensor's data: still a valid file of finite floats
    path.write_bytes(bytes(data))
    with pytest.raises(TranscoderFileError, match="checksum does not match"):
        Transcoder.load(tmp_path)


def test_the_checksum_is_in_the_config_and_version_1_files_still_load(tmp_path):
    original = transcoder(0)
    original.save(tmp_path)
    header = json.loads((tmp_path / "config.json").read_text())
    assert header["format_version"] == 2 and len(header["weights_sha256"]) == 64
    header["format_version"] = 1
    del header["weights_sha256"]
    tensors = {k: v.contiguous() for k, v in original.state_dict().items()}
    save_file(tensors, tmp_path / "transcoder.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(header))
    assert same_weights(Transcoder.load(tmp_path), original)


def test_loading_gives_eval_mode(tmp_path):
    trained = transcoder(0, "batchtopk").train()
    trained.save(tmp_path)
    assert not Transcoder.load(tmp_path).training


def test_atomic_directory_cleans_up_after_a_failure(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out") as tmp:
        (tmp / "file").write_text("partial")
        raise RuntimeError("failed")
    assert list(tmp_path.iterdir()) == []


def test_writable_directory_check(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="exists and is not a directory"):
        check_writable_directory(tmp_path / "file")
    assert check_writable_directory(tmp_path / "new" / "dir").is_dir()
    assert list((tmp_path / "new" / "dir").iterdir()) == []


def test_unwritable_output_paths_are_refused_by_name(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputPathError, match="it is a directory"):
        atomic_write(tmp_path / "dir", lambda tmp: Path(tmp).write_text("y"))
    with pytest.raises(OutputPathError, match="cannot write"):
        atomic_write(tmp_path / "file" / "inside", lambda tmp: Path(tmp).write_text("y"))
    with pytest.raises(OutputPathError, match="exists and is not a directory"), atomic_directory(tmp_path / "file"):
        pass
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):  # root ignores permissions
            pytest.skip("this user can write into read-only directories")
        with pytest.raises(OutputPathError, match="cannot write"):
            atomic_write(read_only / "out.json", lambda tmp: Path(tmp).write_text("y"))
        with pytest.raises(OutputPathError, match="cannot write"):
            check_writable_directory(read_only / "sub")
    finally:
        read_only.chmod(0o755)
    assert (tmp_path / "file").read_text() == "x" and list((tmp_path / "dir").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file", "read_only"]  # no temporary file left
