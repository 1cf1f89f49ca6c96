"""Cross-layer transcoders: the module, its file, splicing, evaluation and training."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import MODEL_PARAMS, build_model, make_clt, make_transcoder
from safetensors.torch import load_file

from tl_transcoders import (
    ConfigError,
    CrossLayerConfig,
    CrossLayerTranscoder,
    SpliceError,
    Transcoder,
    TranscoderFileError,
    cross_layer_config,
    evaluate_splice,
    export_circuit_tracer,
    load_pretrained,
    splice,
)
from tl_transcoders.attribution.virtual_weights import (
    CrossLayerFeatures,
    feature_weights,
    logit_weights,
    top_downstream,
)
from tl_transcoders.evaluation.statistics import fvu
from tl_transcoders.hooks.models import tiny_random_model
from tl_transcoders.training import CrossLayerTrainer, TrainConfig, Trainer

ACTIVATIONS = ["topk", "batchtopk", "relu", "jumprelu"]


def latents_by_hand(clt: CrossLayerTranscoder, i: int, x: torch.Tensor) -> torch.Tensor:
    """Layer index i's dense latents written out from the weights."""
    cfg = clt.cfg
    pre = x @ clt.W_enc[i].T + clt.b_enc[i]
    if cfg.activation == "topk":
        values, indices = pre.topk(cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())
    if cfg.activation == "relu":
        return pre.relu()
    return pre * (pre > clt.threshold[i])  # JumpReLU, BatchTopK's inference threshold


def outputs_by_hand(clt: CrossLayerTranscoder, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every layer's reconstruction from the definition: the sum over source layers."""
    latents = [latents_by_hand(clt, i, x) for i, x in enumerate(inputs)]
    outputs = []
    for t in range(clt.cfg.n_layers):
        out = clt.b_dec[t] + sum(latents[s] @ clt.W_dec[s][:, t - s] for s in range(t + 1))
        outputs.append(out + inputs[t] @ clt.W_skip[t].T if clt.cfg.skip else out)
    return outputs


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("skip", [True, False])
def test_forward_matches_the_definition(activation, skip):
    clt = make_clt(activation=activation, skip=skip)
    x = torch.randn(3, 2, 7, 12)
    expected = torch.stack(outputs_by_hand(clt, list(x)))
    torch.testing.assert_close(clt(x), expected, rtol=1e-5, atol=1e-5)
    assert clt(x).shape == (3, 2, 7, 12)


def test_sparse_gradients_match_the_dense_definition():
    clt = make_clt(activation="topk").train()
    x = torch.randn(3, 20, 12)
    loss = (clt(x) ** 2).sum()
    sparse = torch.autograd.grad(loss, list(clt.parameters()))
    dense = torch.autograd.grad((torch.stack(outputs_by_hand(clt, list(x))) ** 2).sum(), list(clt.parameters()))
    for (name, _), a, b in zip(clt.named_parameters(), sparse, dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_batchtopk_training_selects_across_the_batch():
    clt = make_clt(activation="batchtopk", k=3).train()
    x = torch.randn(3, 16, 12)
    run = clt.run(x)
    for latents in run.latents:
        assert int((latents.values != 0).sum()) <= 3 * 16
    assert int((run.latents[0].values != 0).sum(-1).max()) > 0


def test_bad_inputs_are_refused():
    clt = make_clt()
    with pytest.raises(ValueError, match="n_layers=3"):
        clt(torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match="d_model=12"):
        clt(torch.randn(3, 5, 11))
    with pytest.raises(ConfigError, match="not covered"):
        clt.encode(0, torch.randn(5, 12))
    with pytest.raises(ConfigError, match="larger than d_latent"):
        CrossLayerConfig(d_model=4, d_latent=3, n_layers=2, k=4)
    with pytest.raises(ConfigError, match="n_layers"):
        CrossLayerConfig(d_model=4, d_latent=8, n_layers=0)


def test_save_and_load_round_trip(tmp_path):
    clt = make_clt(activation="jumprelu")
    clt.save(tmp_path / "clt")
    loaded = CrossLayerTranscoder.load(tmp_path / "clt")
    x = torch.randn(3, 4, 12)
    assert torch.equal(loaded(x), clt(x))
    assert loaded.cfg == clt.cfg and not loaded.training


def test_a_directory_of_the_other_kind_is_refused_by_name(tmp_path):
    make_clt().save(tmp_path / "clt")
    with pytest.raises(TranscoderFileError, match="CrossLayerTranscoder.load"):
        Transcoder.load(tmp_path / "clt")
    Transcoder(dict(d_in=4, d_out=4, d_latent=8, layer=0, k=2)).save(tmp_path / "one")
    with pytest.raises(TranscoderFileError, match="Transcoder.load"):
        CrossLayerTranscoder.load(tmp_path / "one")


def test_a_damaged_file_is_refused(tmp_path):
    make_clt().save(tmp_path / "clt")
    weights = tmp_path / "clt" / "transcoder.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(TranscoderFileError, match="checksum"):
        CrossLayerTranscoder.load(tmp_path / "clt")


def bytes_read_from_storage() -> int:
    """Bytes this process has caused to be read from storage (/proc/self/io)."""
    line = next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("read_bytes:"))
    return int(line.split()[1])


def drop_from_page_cache(path: Path) -> None:
    """Ask the system to forget a file's cached pages (written to disk first), so that
    reading them again reads the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_memory_mapped_clt_equals_the_loaded_one_and_never_changes_its_file(tmp_path):
    clt = make_clt(activation="jumprelu")
    clt.save(tmp_path / "clt")
    mapped = CrossLayerTranscoder.load(tmp_path / "clt", mmap=True)
    x = torch.randn(3, 4, 12)
    assert torch.equal(mapped(x), clt(x)) and not mapped.training
    with torch.no_grad():
        mapped.W_dec[0].mul_(2)  # copy-on-write: the file keeps the saved weights
    assert torch.equal(CrossLayerTranscoder.load(tmp_path / "clt")(x), clt(x))
    with pytest.raises(TranscoderFileError, match="device='cpu'"):
        CrossLayerTranscoder.load(tmp_path / "clt", device="meta", mmap=True)
    with pytest.raises(TranscoderFileError, match="keeps the stored dtype"):
        CrossLayerTranscoder.load(tmp_path / "clt", dtype=torch.float64, mmap=True)
    weights = tmp_path / "clt" / "transcoder.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(TranscoderFileError, match="checksum"):
        CrossLayerTranscoder.load(tmp_path / "clt", mmap=True)


@pytest.mark.skipif(
    not Path("/proc/self/io").is_file() or not hasattr(os, "posix_fadvise"), reason="reads I/O counts from /proc"
)
def test_attributing_through_a_memory_mapped_clt_reads_only_active_decoder_rows(tmp_path):
    # reads from storage, which no backend changes: one model is enough (the file is 75 MB)
    from tl_transcoders.attribution.attribute import attribute

    model = build_model(MODEL_PARAMS[0])
    clt = make_clt(model, layers=[0, 1, 2], d_latent=1 << 17, k=3)
    clt.save(tmp_path / "clt")
    tokens = torch.randint(3, model.cfg.d_vocab, (6,), generator=torch.Generator().manual_seed(0))
    expected = attribute(model, [clt], tokens)
    mapped = CrossLayerTranscoder.load(tmp_path / "clt", mmap=True)
    weights = tmp_path / "clt" / "transcoder.safetensors"
    decoder_bytes = sum(W.numel() * W.element_size() for W in mapped.W_dec)
    other_bytes = weights.stat().st_size - decoder_bytes  # encoders and the rest: read whole
    drop_from_page_cache(weights)
    before = bytes_read_from_storage()
    graph = attribute(model, [mapped], tokens)
    read = bytes_read_from_storage() - before
    assert torch.equal(graph.features, expected.features)
    assert torch.allclose(graph.adjacency, expected.adjacency, rtol=1e-5, atol=1e-6)
    limit = other_bytes + 0.25 * decoder_bytes  # the encoders' read-ahead may run into the decoders
    assert read < limit, f"attribution read {read} bytes, {other_bytes} outside the {decoder_bytes} of decoders"
    before = bytes_read_from_storage()  # the count is sensitive: reading every decoder reads them from disk
    assert all(torch.isfinite(W).all() for W in mapped.W_dec)
    assert bytes_read_from_storage() - before > 0.5 * decoder_bytes


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_error_term_reproduces_clean_logits(model, tokens, activation):
    clt = make_clt(model, activation=activation)
    clean = model(tokens)
    with splice(model, clt, error_term=True):
        spliced = model(tokens)
    assert (spliced - clean).abs().max().item() <= 1e-5


def test_error_term_lets_gradients_reach_every_decoder(model, tokens):
    clt = make_clt(model)
    with splice(model, clt, error_term=True):
        model(tokens).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in clt.W_dec)


def layer_by_hand(clt: CrossLayerTranscoder, inputs: dict[int, torch.Tensor], t: int) -> torch.Tensor:
    """Layer index t's reconstruction from the inputs of layers 0..t seen so far."""
    return outputs_by_hand(clt, [inputs[s] for s in range(t + 1)] + [inputs[t]] * (clt.cfg.n_layers - t - 1))[t]


@pytest.mark.parametrize("activation, skip", [("topk", True), ("relu", False)])
def test_splice_equals_hand_written_hooks(model, tokens, activation, skip):
    clt = make_clt(model, activation=activation, skip=skip)
    inputs: dict[int, torch.Tensor] = {}
    handles, hooks = [], []
    for i, layer in enumerate(clt.cfg.layers):  # each MLP module's own input, by a PyTorch pre-hook
        capture = model.blocks[layer].mlp.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
        handles.append(capture)
        hooks.append((f"blocks.{layer}.hook_mlp_out", lambda act, hook, i=i: layer_by_hand(clt, inputs, i)))
    with torch.no_grad():
        try:
            expected = model.run_with_hooks(tokens, fwd_hooks=hooks)
        finally:
            for handle in handles:
                handle.remove()
        with splice(model, clt):
            spliced = model(tokens)
    torch.testing.assert_close(spliced, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(spliced, model(tokens), atol=1e-3), "the splice changed nothing"


def test_a_clt_and_transcoders_over_other_layers_splice_together(model, tokens):
    clt = make_clt(model, layers=[1, 2])
    transcoder = make_transcoder(model, 0)
    clean = model(tokens)
    with torch.no_grad(), splice(model, [transcoder, clt], error_term=True):
        assert (model(tokens) - clean).abs().max() <= 1e-5
    with pytest.raises(SpliceError, match="both write blocks.1.hook_mlp_out"):
        with splice(model, [make_transcoder(model, 1), clt]):
            pass


def test_a_clt_that_does_not_fit_is_refused(model):
    clt = make_clt(model)
    with pytest.raises(SpliceError, match="trained on model"):
        other = make_clt(model)
        other.cfg.model_name = "another-model"
        with splice(model, other):
            pass
    wide = CrossLayerTranscoder(CrossLayerConfig(d_model=model.cfg.d_model + 1, d_latent=8, n_layers=2, k=2)).eval()
    with pytest.raises(SpliceError, match="d_model"):
        with splice(model, wide):
            pass
    beyond = CrossLayerTranscoder(
        CrossLayerConfig(d_model=model.cfg.d_model, d_latent=8, n_layers=2, first_layer=model.cfg.n_layers - 1, k=2)
    )
    with pytest.raises(SpliceError, match="out of range"):
        with splice(model, beyond):
            pass
    with pytest.raises(Exception, match="consecutive"):
        cross_layer_config(model, [0, 2], d_latent=8)
    assert clt.cfg.input_space is not None


def test_evaluate_splice_reports_every_layer_of_a_clt(model, tokens):
    clt = make_clt(model)
    report = evaluate_splice(model, clt, tokens)
    assert sorted(report.layers) == list(clt.cfg.layers)
    cache = {}
    handles = [
        model.blocks[layer].mlp.register_forward_pre_hook(
            lambda m, args, layer=layer: cache.__setitem__(layer, args[0])
        )
        for layer in clt.cfg.layers
    ]
    try:
        _, outputs = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_mlp_out"))
    finally:
        for handle in handles:
            handle.remove()
    inputs = torch.stack([cache[layer] for layer in clt.cfg.layers])
    with torch.no_grad():
        run = clt.run(inputs)
        for i, layer in enumerate(clt.cfg.layers):
            target = outputs[f"blocks.{layer}.hook_mlp_out"]
            expected = fvu(target.reshape(-1, target.shape[-1]), run.outputs[i].reshape(-1, target.shape[-1]))
            assert report.layers[layer].fvu == pytest.approx(float(expected), rel=1e-4)
            assert report.layers[layer].l0 == pytest.approx(float((run.latents[i].values != 0).sum(-1).double().mean()))
        with splice(model, clt):
            spliced_ce = model(tokens, return_type="loss")
    assert float(report.ce_all_spliced) == pytest.approx(float(spliced_ce), rel=1e-4)


# --- training ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model()


def random_batches(model, batch_size=8, context_size=32, seed=0, n=None):
    generator = torch.Generator().manual_seed(seed)
    count = 0
    while n is None or count < n:
        count += 1
        yield torch.randint(0, model.cfg.d_vocab, (batch_size, context_size), generator=generator)


def clt_config(tmp_path, **options):
    defaults = dict(
        layers=[0, 1, 2],
        cross_layer=True,
        k=8,
        expansion=4,
        batch_size=8,
        context_size=32,
        max_tokens=8 * 32 * 40,
        output_dir=str(tmp_path),
        log_every=10,
        l1_coefficient=1e-2,
    )
    return TrainConfig(**{**defaults, **options})


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_training_lowers_every_layers_fvu(tiny, tmp_path, activation):
    trainer = Trainer(tiny, clt_config(tmp_path, activation=activation))
    assert isinstance(trainer, CrossLayerTrainer)
    (clt,) = trainer.fit(random_batches(tiny))
    first, last = trainer.history[0], trainer.history[-1]
    for layer in (0, 1, 2):
        assert last[f"layer{layer}/fvu"] < first[f"layer{layer}/fvu"] - 0.02, (layer, first, last)
    loaded = CrossLayerTranscoder.load(tmp_path / "cross_layer")
    assert isinstance(clt, CrossLayerTranscoder) and loaded.cfg == clt.cfg
    report = evaluate_splice(tiny, loaded, next(random_batches(tiny, seed=1)))
    assert all(report.layers[layer].fvu < 1.0 for layer in (0, 1, 2))


def test_the_saved_clt_reads_and_writes_the_models_own_activations(tiny, tmp_path):
    trainer = Trainer(tiny, clt_config(tmp_path, max_tokens=8 * 32 * 5))
    trainer.fit(random_batches(tiny))
    (folded,) = trainer.folded_all()
    x = torch.randn(3, 10, tiny.cfg.d_model)
    s_in = torch.tensor([trainer.scales[layer][0] for layer in (0, 1, 2)])[:, None, None]
    s_out = torch.tensor([trainer.scales[layer][1] for layer in (0, 1, 2)])[:, None, None]
    assert not torch.allclose(s_in, torch.ones(()))
    with torch.no_grad():
        expected = trainer.clt.eval()(x / s_in) * s_out
    torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5)


def test_resume_is_exact(tiny, tmp_path):
    options = dict(max_tokens=8 * 32 * 12, checkpoint_every=4, shuffle_buffer=2)
    whole = Trainer(tiny, clt_config(tmp_path / "whole", **options))
    whole.fit(random_batches(tiny))
    cut = Trainer(tiny, clt_config(tmp_path / "cut", **options))
    with pytest.warns(UserWarning, match="ran out"):
        cut.fit(random_batches(tiny, n=9))  # 2 batches fill the buffer: 7 steps, checkpoint at 4
    resumed = Trainer(tiny, clt_config(tmp_path / "cut", resume=True, **options))
    assert resumed.step == 0
    resumed.fit(random_batches(tiny))
    expected = load_file(tmp_path / "whole" / "cross_layer" / "transcoder.safetensors")
    found = load_file(tmp_path / "cut" / "cross_layer" / "transcoder.safetensors")
    assert expected.keys() == found.keys()
    for name in expected:
        assert torch.equal(expected[name], found[name]), name


def test_cross_layer_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="consecutive"):
        clt_config(tmp_path, layers=[0, 2])
    with pytest.raises(ConfigError, match="leave sae"):
        clt_config(tmp_path, sae=True, skip=False)


# --- files from elsewhere ---------------------------------------------------------------

CIRCUIT_TRACER = Path(__file__).parent / "fixtures" / "circuit_tracer"


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("name, activation", [("clt_relu", "relu"), ("clt_jumprelu", "jumprelu")])
def test_circuit_tracer_clts_reproduce_the_librarys_outputs(name, activation, mmap):
    clt = load_pretrained(CIRCUIT_TRACER / name, mmap=mmap)
    assert isinstance(clt, CrossLayerTranscoder)
    assert clt.cfg.activation == activation and clt.cfg.n_layers == 3 and clt.cfg.input_hook == "mlp.hook_in"
    expected = load_file(CIRCUIT_TRACER / "clt_expected.safetensors")
    x = expected[f"{name}/x"]
    with torch.no_grad():
        torch.testing.assert_close(clt(x), expected[f"{name}/out"], rtol=1e-5, atol=1e-5)
        acts = torch.stack([clt.encode(layer, x[layer]) for layer in clt.cfg.layers])
    torch.testing.assert_close(acts, expected[f"{name}/acts"], rtol=1e-5, atol=1e-6)


def test_export_to_circuit_tracer_and_back(tmp_path):
    clt = make_clt(activation="jumprelu", skip=False)
    clt.cfg.first_layer, clt.cfg.input_space = 0, "folded_ln"
    export_circuit_tracer(clt, tmp_path / "ct")
    loaded = load_pretrained(tmp_path / "ct")
    x = torch.randn(3, 5, 12)
    assert torch.equal(loaded(x), clt(x))
    assert loaded.cfg.input_hook == clt.cfg.input_hook and loaded.cfg.input_space == clt.cfg.input_space


def test_clts_circuit_tracer_cannot_run_are_refused_on_export(tmp_path):
    with pytest.raises(TranscoderFileError, match="TopK"):
        export_circuit_tracer(make_clt(activation="topk", skip=False), tmp_path / "a")
    with pytest.raises(TranscoderFileError, match="skip"):
        export_circuit_tracer(make_clt(activation="relu", skip=True), tmp_path / "b")


def test_a_saved_clt_loads_through_load_pretrained(tmp_path):
    clt = make_clt()
    clt.save(tmp_path / "clt")
    loaded = load_pretrained(tmp_path / "clt", model_name="other")
    assert isinstance(loaded, CrossLayerTranscoder) and loaded.cfg.model_name == "other"
    with pytest.raises(TranscoderFileError, match="do not apply"):
        load_pretrained(tmp_path / "clt", layers=[1])
    mapped = load_pretrained(tmp_path / "clt", mmap=True)
    x = torch.randn(3, 2, 12)
    assert torch.equal(mapped(x), clt(x))
    with pytest.raises(TranscoderFileError, match="keeps the stored dtype"):
        load_pretrained(CIRCUIT_TRACER / "clt_relu", mmap=True, dtype=torch.float64)
    Transcoder(dict(d_in=4, d_out=4, d_latent=8, layer=0, k=2)).save(tmp_path / "one")
    with pytest.raises(TranscoderFileError, match="mmap=True applies to cross-layer transcoders"):
        load_pretrained(tmp_path / "one", mmap=True)


def test_a_damaged_circuit_tracer_clt_is_refused(tmp_path):
    import shutil

    shutil.copytree(CIRCUIT_TRACER / "clt_relu", tmp_path / "clt")
    (tmp_path / "clt" / "W_dec_1.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TranscoderFileError, match="W_dec_1"):
        load_pretrained(tmp_path / "clt")
    (tmp_path / "clt" / "W_enc_2.safetensors").unlink()
    with pytest.raises(TranscoderFileError):
        load_pretrained(tmp_path / "clt")


# --- virtual weights ----------------------------------------------------------------------


def as_transcoder(model, clt: CrossLayerTranscoder, source: int, target: int) -> Transcoder:
    """A per-layer transcoder at `target` holding the decoder of `source`'s CLT features
    into `target` (and `source`'s encoder): what those features write there."""
    i = clt.index_of(source)
    t = make_transcoder(model, target, skip=False, d_latent=clt.cfg.d_latent, k=clt.cfg.k)
    with torch.no_grad():
        t.W_dec.copy_(clt.W_dec[i][:, target - source])
        t.W_enc.copy_(clt.W_enc[i])
    return t


def test_virtual_weights_of_clt_features_sum_their_decoders_before_the_reader(model):
    clt = make_clt(model, layers=[0, 1], skip=False)
    reader = make_transcoder(model, 2)
    source = CrossLayerFeatures(clt, 0)
    found = feature_weights(model, source, reader)
    expected = sum(feature_weights(model, as_transcoder(model, clt, 0, u), reader) for u in (0, 1))
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(found, feature_weights(model, as_transcoder(model, clt, 0, 0), reader))
    # The logits read after every layer: both decoders count.
    logits = logit_weights(model, source, tokens=[1, 2, 3])
    expected = sum(logit_weights(model, as_transcoder(model, clt, 0, u), tokens=[1, 2, 3]) for u in (0, 1))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    top = top_downstream(model, source, 3, reader, k=5)
    torch.testing.assert_close(top.values.abs(), found[3].abs().sort(descending=True).values[:5])
    # As a target, a CLT layer's features read as a transcoder of that layer would.
    later = make_clt(model, layers=[1, 2], skip=False)
    upstream = make_transcoder(model, 0)
    torch.testing.assert_close(
        feature_weights(model, upstream, CrossLayerFeatures(later, 2)),
        feature_weights(model, upstream, as_transcoder(model, later, 2, 2)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_functions_for_per_layer_transcoders_refuse_a_clt_by_name(model, tokens, without_type_checker):
    from tl_transcoders.attribution.paths import run_prompt

    clt = make_clt(model)
    with pytest.raises(Exception, match="per-layer transcoders"):
        run_prompt(model, [clt], tokens[0])
