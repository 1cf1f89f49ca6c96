"""Multi-process training (torchrun, gloo on CPU) against a single process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tl_transcoders import Transcoder

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from tl_transcoders.hooks.models import tiny_random_model
    from tl_transcoders.training import TrainConfig, Trainer

    torch.set_num_threads(1)
    output_dir, distribute, activation = sys.argv[1:4]
    model = tiny_random_model()

    def batches():
        generator = torch.Generator().manual_seed(0)
        while True:
            yield torch.randint(0, model.cfg.d_vocab, (8, 16), generator=generator)

    cfg = TrainConfig(layers=[0, 1, 2], activation=activation, k=4, expansion=2, batch_size=8,
                      context_size=16, max_tokens=8 * 16 * 12, output_dir=output_dir,
                      distribute=distribute, normalize=True, dead_tokens=64, log_every=4,
                      dtype="float64", lr=2e-3)
    Trainer(model, cfg).fit(batches())
    """
)


def run(script, output_dir, distribute, activation, processes):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    result = subprocess.run(
        [*launcher, str(script), str(output_dir), distribute, activation],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("distribute, activation", [("data", "topk"), ("data", "relu"), ("layers", "topk")])
def test_two_processes_match_one(tmp_path, distribute, activation):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    run(script, tmp_path / "one", distribute, activation, processes=1)
    run(script, tmp_path / "two", distribute, activation, processes=2)
    for layer in (0, 1, 2):
        single = Transcoder.load(tmp_path / "one" / f"layer_{layer}")
        double = Transcoder.load(tmp_path / "two" / f"layer_{layer}")
        for name, value in single.state_dict().items():
            # In float64 the different summation order of two shards leaves ~1e-12.
            difference = (value - double.state_dict()[name]).abs().max()
            assert difference <= 1e-8 * value.abs().max(), (layer, name, difference.item())
