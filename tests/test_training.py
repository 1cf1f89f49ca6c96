"""Trainer: FVU falls, one forward pass feeds every layer, exact resume after SIGKILL,
normalisation folded on save, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from tl_transcoders import Transcoder, evaluate_splice
from tl_transcoders.core.config import ConfigError
from tl_transcoders.hooks.models import tiny_random_model
from tl_transcoders.hooks.sites import attach, capture, capture_groups
from tl_transcoders.hooks.tokens import TokenError
from tl_transcoders.training import TrainConfig, Trainer, TrainingError, fit_together


@pytest.fixture(scope="module")
def model():
    return tiny_random_model()


def random_batches(model, batch_size=8, context_size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, model.cfg.d_vocab, (batch_size, context_size), generator=generator)


def config(tmp_path, **kwargs):
    options = dict(
        layers=[1],
        k=8,
        expansion=4,
        batch_size=8,
        context_size=32,
        max_tokens=8 * 32 * 60,
        output_dir=str(tmp_path),
        log_every=10,
        normalize=True,
    )
    options.update(kwargs)
    return TrainConfig(**options)


@pytest.mark.parametrize(
    "activation, skip",
    [("topk", True), ("topk", False), ("batchtopk", True), ("relu", True), ("jumprelu", False)],
)
def test_fvu_falls(model, tmp_path, activation, skip):
    trainer = Trainer(
        model, config(tmp_path, activation=activation, skip=skip, l1_coefficient=1e-2, max_tokens=8 * 32 * 40)
    )
    trainer.fit(random_batches(model))
    fvus = [h["fvu"] for h in trainer.history]
    assert len(fvus) == 4 and fvus[-1] < fvus[0] - 0.02, fvus


def test_sae_mode_trains_on_one_site(model, tmp_path):
    trainer = Trainer(model, config(tmp_path, sae=True, skip=False))
    (sae,) = trainer.fit(random_batches(model))
    assert sae.cfg.is_sae and sae.cfg.input_site == "blocks.1.hook_mlp_out"
    assert trainer.history[-1]["fvu"] < trainer.history[0]["fvu"]


def test_one_forward_pass_feeds_every_layer_and_stops_early(model, tmp_path):
    calls = {"embed": 0, "last_block": 0}
    handles = [
        model.embed.register_forward_hook(lambda *a: calls.__setitem__("embed", calls["embed"] + 1)),
        model.blocks[3].register_forward_hook(lambda *a: calls.__setitem__("last_block", calls["last_block"] + 1)),
    ]
    try:
        trainer = Trainer(model, config(tmp_path, layers=[0, 1, 2], max_tokens=8 * 32 * 5))
        calls.update(embed=0, last_block=0)  # ignore the site checks made while building
        trainer.fit(random_batches(model))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {"embed": 5, "last_block": 0}


def test_capture_groups_hands_each_layer_over_before_the_next_layer_runs(model):
    """Each group is consumed from inside the pass, as soon as its last site fires, with
    exactly the activations `capture` collects."""
    groups = [(f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out") for layer in range(3)]
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    expected = capture(model, tokens, [site for group in groups for site in group])
    events = []

    def consume(i, acts):
        events.append(f"group {i}")
        assert set(acts) == set(groups[i])
        for site, value in acts.items():
            assert torch.equal(value, expected[site]), site

    resid = [
        (f"blocks.{layer}.hook_resid_pre", lambda a, layer=layer: events.append(f"block {layer}")) for layer in range(3)
    ]
    with attach(model, resid):
        capture_groups(model, tokens, groups, consume)
    assert events == ["block 0", "group 0", "block 1", "group 1", "block 2", "group 2"]


def test_training_inside_the_pass_equals_training_on_captured_activations(model, tmp_path):
    """`fit` trains each layer from inside the forward pass; the weights are those of
    `train_on` fed every layer's activations captured beforehand."""
    cfg = dict(layers=[0, 2], max_tokens=8 * 32 * 6, activation="topk", skip=True)
    streamed = Trainer(model, config(tmp_path / "streamed", **cfg))
    streamed.fit(random_batches(model))
    captured = Trainer(model, config(tmp_path / "captured", **cfg))
    captured.begin()
    batches = random_batches(model)
    while not captured.done:
        captured.train_on(capture(model, next(batches), captured.sites))
    for layer in (0, 2):
        for name, value in streamed.transcoders[layer].state_dict().items():
            assert torch.equal(value, captured.transcoders[layer].state_dict()[name]), (layer, name)


def test_saved_transcoders_work_in_the_model_space(model, tmp_path):
    """Normalisation is folded back: the saved transcoder on raw activations equals the
    trained one on normalised activations, scaled back."""
    trainer = Trainer(model, config(tmp_path, normalize=True))
    (saved,) = trainer.fit(random_batches(model))
    loaded = Transcoder.load(tmp_path / "layer_1").eval()
    s_in, s_out = trainer.scales[1]
    assert s_in != 1.0 and s_out != 1.0
    x = torch.randn(5, 64)
    trained = trainer.transcoders[1].eval()
    assert torch.allclose(loaded(x), s_out * trained(x / s_in), atol=1e-5)
    report = evaluate_splice(model, [loaded], next(random_batches(model, seed=9)))
    assert report.layers[1].fvu < 1.0


RUN = textwrap.dedent(
    """
    import sys, time, torch
    from tl_transcoders.hooks.models import tiny_random_model
    from tl_transcoders.training import TrainConfig, Trainer, fit_together

    torch.set_num_threads(1)
    output_dir, resume, delay = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
    model = tiny_random_model()

    def batches():
        generator = torch.Generator().manual_seed(0)
        while True:
            time.sleep(delay)
            yield torch.randint(0, model.cfg.d_vocab, (4, 16), generator=generator)

    cfg = TrainConfig(layers=[0, 2], k=4, expansion=2, batch_size=4, context_size=16,
                      max_tokens=4 * 16 * 40, checkpoint_every=5, output_dir=output_dir,
                      resume=resume, shuffle_buffer=2, log_every=5, normalize=True)
    Trainer(model, cfg).fit(batches())
    """
)


def test_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, str(script), str(whole), "0", "0"], check=True, env=env, capture_output=True)

    process = subprocess.Popen(
        [sys.executable, str(script), str(killed), "0", "0.2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = killed / "checkpoint.pt"
    deadline = time.time() + 120
    while (
        time.time() < deadline and torch.load(checkpoint, weights_only=False)["step"] < 10
        if checkpoint.exists()
        else time.time() < deadline
    ):
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "layer_0").exists(), "the run should have been killed before finishing"

    subprocess.run([sys.executable, str(script), str(killed), "1", "0"], check=True, env=env, capture_output=True)
    for layer in (0, 2):
        expected = load_file(whole / f"layer_{layer}" / "transcoder.safetensors")
        resumed = load_file(killed / f"layer_{layer}" / "transcoder.safetensors")
        for name in expected:
            assert torch.equal(expected[name], resumed[name]), f"layer {layer} {name} differs"


# --- bad input ------------------------------------------------------------------------


def test_context_longer_than_the_model(model, tmp_path):
    with pytest.raises(ValueError, match="context_size 256 is longer than the model's context"):
        Trainer(model, config(tmp_path, context_size=256))


def test_no_full_batch(model, tmp_path):
    with pytest.raises(ValueError, match="no training step ran"):
        Trainer(model, config(tmp_path)).fit(iter([]))


def test_nan_activations_keep_the_last_checkpoint(model, tmp_path):
    trainer = Trainer(model, config(tmp_path, checkpoint_every=2))

    def batches():
        source = random_batches(model)
        for _ in range(3):
            yield next(source)
        with torch.no_grad():
            embedding = next(p for name, p in model.named_parameters() if "embed" in name)
            embedding.fill_(float("nan"))
        yield next(source)

    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        with pytest.raises(FloatingPointError, match="NaN or inf activations.*last checkpoint is kept"):
            trainer.fit(batches())
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(saved[name])
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2


def test_bad_options():
    with pytest.raises(ValueError, match="an SAE cannot have a skip term"):
        TrainConfig(layers=[0], sae=True, skip=True)
    with pytest.raises(ValueError, match="layers must be a non-empty list"):
        TrainConfig(layers=[])


def test_spliced_ce_during_training_and_wandb(model, tmp_path, monkeypatch):
    logged = []

    class Run:
        def log(self, metrics, step):
            logged.append((step, metrics))

        def finish(self):
            logged.append("finished")

    fake_wandb = type(sys)("wandb")
    fake_wandb.init = lambda project, config: Run()
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    eval_tokens = next(random_batches(model, batch_size=4, seed=5))
    trainer = Trainer(model, config(tmp_path, max_tokens=8 * 32 * 20, log_every=10, eval_every=4, wandb_project="test"))
    (transcoder,) = trainer.fit(random_batches(model), eval_tokens=eval_tokens)
    assert [step for step, _ in logged[:-1]] == [4, 8, 10, 12, 16, 20] and logged[-1] == "finished"
    assert ["ce_clean" in metrics for _, metrics in logged[:-1]] == [True, True, False, True, True, True]
    final = logged[-2][1]
    expected = evaluate_splice(model, [transcoder], eval_tokens)
    assert final["layer1/ce_spliced"] == pytest.approx(expected.layers[1].ce_spliced, rel=1e-5)
    assert final["ce_clean"] == pytest.approx(expected.ce_clean, rel=1e-6)


def test_capture_at_the_last_layer_skips_the_unembedding(model):
    from tl_transcoders.hooks.sites import capture, is_bridge

    calls = []
    handle = model.unembed.register_forward_hook(lambda *args: calls.append(1))
    try:
        acts = capture(model, torch.zeros(1, 4, dtype=torch.long), ["blocks.3.hook_mlp_out"])
    finally:
        handle.remove()
    assert acts["blocks.3.hook_mlp_out"].shape == (4, 64)
    assert len(calls) == (1 if is_bridge(model) else 0)


@pytest.mark.parametrize("normalize", [False, True])
def test_skip_term_starts_at_the_least_squares_fit(model, tmp_path, normalize):
    trainer = Trainer(model, config(tmp_path, normalize=normalize))
    transcoder = trainer.transcoders[1]
    d_in, d_out = transcoder.cfg.d_in, transcoder.cfg.d_out
    generator = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(512, d_in, generator=generator) + 1
    linear = torch.randn(d_out, d_in, generator=generator)
    y = x @ linear.T + torch.randn(d_out, generator=generator)
    trainer._initialise_place(trainer.placements[0], {transcoder.cfg.input_site: x, transcoder.cfg.output_site: y})
    with torch.no_grad():
        y_hat = trainer.folded(1)(x)
    fvu = (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert fvu < 1e-5, fvu


def test_fit_together_equals_separate_runs_from_one_forward_pass(model, tmp_path):
    """An SAE, a transcoder and a skip transcoder of two layers trained together get the
    same weights as trained one by one, with one model forward per batch."""
    variants = {"sae": dict(sae=True, skip=False), "transcoder": dict(skip=False), "skip": dict(skip=True)}

    def trainers(root):
        return [
            Trainer(model, config(root / name, layers=[1, 2], max_tokens=8 * 32 * 12, **options))
            for name, options in variants.items()
        ]

    built = trainers(tmp_path / "together")  # building probes the model's sites
    forwards = []
    handle = model.embed.register_forward_hook(lambda *args: forwards.append(1))
    try:
        together = fit_together(built, random_batches(model))
    finally:
        handle.remove()
    assert len(forwards) == 12
    for (name, options), result in zip(variants.items(), together):
        (alone,) = [Trainer(model, config(tmp_path / "alone" / name, layers=[1, 2], max_tokens=8 * 32 * 12, **options))]
        expected = alone.fit(random_batches(model))
        for a, b in zip(result, expected):
            assert a.cfg.input_site == b.cfg.input_site and a.cfg.output_site == b.cfg.output_site
            for key, value in a.state_dict().items():
                assert torch.equal(value, b.state_dict()[key]), (name, key)
    sae, transcoder = together[0][0], together[1][0]
    assert sae.cfg.output_site == transcoder.cfg.output_site  # both splice at the MLP output


def test_fit_together_rejects_mismatched_trainers(model, tmp_path):
    a = Trainer(model, config(tmp_path / "a"))
    with pytest.raises(ValueError, match="same batch_size"):
        fit_together([a, Trainer(model, config(tmp_path / "b", batch_size=4))], random_batches(model))
    with pytest.raises(ValueError, match="own output_dir"):
        fit_together([a, Trainer(model, config(tmp_path / "a", skip=False))], random_batches(model))


# --- checked before the first step, nothing lost ----------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(lr=0.0), "lr must be a positive finite number"),
        (dict(lr=-1e-3), "lr must be a positive finite number"),
        (dict(lr=float("nan")), "lr must be a positive finite number"),
        (dict(k=0), "k must be positive"),
        (dict(d_latent=8, k=9), "k=9 is larger than d_latent=8"),
        (dict(batch_size=0), "batch_size must be positive"),
        (dict(max_tokens=10), "less than one step"),
        (dict(auxk_alpha=-1.0), "auxk_alpha must be a finite number >= 0"),
        (dict(activation="gelu"), "activation must be one of"),
        (dict(resume=True, overwrite=True), "resume and overwrite exclude each other"),
        (dict(layers=[0, 1], input_site="blocks.0.hook_resid_mid"), "use a template with {layer}"),
    ],
)
def test_bad_options_are_refused_when_built(tmp_path, options, message, without_type_checker):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **options)


def test_a_changed_config_is_refused_when_used(model, tmp_path):
    cfg = config(tmp_path)
    cfg.lr = -1.0
    with pytest.raises(ConfigError, match="lr must be"):
        Trainer(model, cfg)


def test_k_larger_than_the_dictionary_is_refused_not_lowered(model, tmp_path):
    with pytest.raises(TrainingError, match="k=300 is larger than the 256 latents of layer 1's transcoder"):
        Trainer(model, config(tmp_path, k=300, expansion=4))


def test_an_output_dir_that_is_a_file_is_refused_before_training(model, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError, match="output_dir .*file cannot be used"):
        Trainer(model, config(tmp_path / "file"))


def test_a_fresh_run_refuses_a_directory_holding_a_checkpoint(model, tmp_path):
    Trainer(model, config(tmp_path, max_tokens=8 * 32 * 4, checkpoint_every=2)).fit(random_batches(model))
    with pytest.raises(TrainingError, match="holds the checkpoint of an earlier run.*resume=True.*overwrite=True"):
        Trainer(model, config(tmp_path, max_tokens=8 * 32 * 4, checkpoint_every=2))
    before = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"]
    assert before == 4, "the refused run wrote nothing"
    again = Trainer(model, config(tmp_path, max_tokens=8 * 32 * 2, checkpoint_every=2, overwrite=True))
    again.fit(random_batches(model))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2


def test_a_fresh_run_refuses_a_directory_holding_a_finished_runs_transcoders(model, tmp_path):
    """A run shorter than checkpoint_every leaves no checkpoint, only its record and its
    transcoders: a second run must not replace them silently."""
    short = dict(max_tokens=8 * 32 * 2, checkpoint_every=1000)
    Trainer(model, config(tmp_path, **short)).fit(random_batches(model))
    saved = (tmp_path / "layer_1" / "transcoder.safetensors").read_bytes()
    refused = r"saved results of an earlier run \(training.json, layer_1\).*overwrite=True"
    with pytest.raises(TrainingError, match=refused):
        Trainer(model, config(tmp_path, seed=5, **short))
    assert (tmp_path / "layer_1" / "transcoder.safetensors").read_bytes() == saved, "the refused run wrote nothing"
    Trainer(model, config(tmp_path, seed=5, overwrite=True, **short)).fit(random_batches(model, seed=1))
    assert (tmp_path / "layer_1" / "transcoder.safetensors").read_bytes() != saved


def test_a_config_changed_after_the_trainer_was_built_changes_nothing(model, tmp_path):
    cfg = config(tmp_path, max_tokens=8 * 32 * 2)
    trainer = Trainer(model, cfg)
    cfg.k, cfg.max_tokens = 0, 10**9
    (transcoder,) = trainer.fit(random_batches(model))
    assert transcoder.cfg.k == 8 and trainer.step == 2
    assert json.loads((tmp_path / "training.json").read_text())["config"]["k"] == 8


def test_resume_falls_back_to_the_previous_checkpoint_when_the_latest_is_truncated(model, tmp_path):
    whole = Trainer(model, config(tmp_path / "whole", max_tokens=8 * 32 * 6, checkpoint_every=2))
    expected = whole.fit(random_batches(model))
    run = config(tmp_path / "cut", max_tokens=8 * 32 * 6, checkpoint_every=2)
    partial = Trainer(model, run)

    def first_five():
        source = random_batches(model)
        for _ in range(5):
            yield next(source)

    partial.fit(first_five())  # checkpoints at steps 2 and 4: checkpoint.pt (4), checkpoint.prev.pt (2)
    latest = tmp_path / "cut" / "checkpoint.pt"
    assert (tmp_path / "cut" / "checkpoint.prev.pt").exists()
    latest.write_bytes(latest.read_bytes()[:1000])  # a crash while copying, a full disk ...
    resumed = Trainer(model, config(tmp_path / "cut", max_tokens=8 * 32 * 6, checkpoint_every=2, resume=True))
    with pytest.warns(UserWarning, match="resuming from the previous one.*step 2"):
        result = resumed.fit(random_batches(model))
    for a, b in zip(result, expected):
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), key


def test_a_run_whose_data_ends_early_says_so(model, tmp_path):
    def three():
        source = random_batches(model)
        for _ in range(3):
            yield next(source)

    with pytest.warns(UserWarning, match="data ran out after 3 of 60 steps"):
        Trainer(model, config(tmp_path)).fit(three())
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["complete"] is False and record["steps"] == 3 and record["total_steps"] == 60
    assert Transcoder.load(tmp_path / "layer_1").cfg.layer == 1, "what was trained is saved"


def test_a_finished_run_records_it(model, tmp_path):
    Trainer(model, config(tmp_path, max_tokens=8 * 32 * 3)).fit(random_batches(model))
    record = json.loads((tmp_path / "training.json").read_text())
    assert record["complete"] is True and record["tokens"] == 8 * 32 * 3


@pytest.mark.parametrize(
    "batch, error, message",
    [
        (lambda m: torch.full((8, 32), m.cfg.d_vocab), TokenError, "training batch 0: token ids must lie in"),
        (lambda m: torch.zeros(8, 32), TokenError, "training batch 0: token ids must be integers"),
        (lambda m: torch.zeros(4, 32, dtype=torch.long), TrainingError, r"training batch 0 has shape \(4, 32\)"),
    ],
)
def test_bad_training_batches_are_refused(model, tmp_path, batch, error, message):
    with pytest.raises(error, match=message):
        Trainer(model, config(tmp_path)).fit(iter([batch(model)]))


def test_ctrl_c_between_batches_keeps_the_progress(model, tmp_path):
    def interrupted():
        source = random_batches(model)
        for _ in range(3):
            yield next(source)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Trainer(model, config(tmp_path, checkpoint_every=100)).fit(interrupted())
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_diverging_run_stops_with_a_clear_error(model, tmp_path):
    from tl_transcoders.training import NonFiniteError

    trainer = Trainer(model, config(tmp_path, lr=1e30, activation="relu"))
    with pytest.raises(NonFiniteError, match="diverged.*Lower lr"):
        trainer.fit(random_batches(model))
