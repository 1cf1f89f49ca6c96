"""splice(): replacing MLP outputs with transcoder outputs through hooks."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, build_model, make_transcoder

from tl_transcoders import SpliceError, Transcoder, TranscoderConfig, splice
from tl_transcoders.hooks.sites import is_bridge


def hook_state(model: torch.nn.Module) -> dict[str, tuple]:
    """Every hook registered on any hook point or module of the model (the Bridge keeps
    some module hooks of its own, so tests compare snapshots)."""
    state = {}
    for name, module in model.named_modules():
        hooks = (
            tuple(module._forward_hooks),
            tuple(module._forward_pre_hooks),
            len(getattr(module, "fwd_hooks", ())),
            len(getattr(module, "bwd_hooks", ())),
        )
        if any(hooks):
            state[name] = hooks
    return state


def by_hand(transcoder: Transcoder, x: torch.Tensor) -> torch.Tensor:
    """The transcoder's output written out from its weights, independent of its code."""
    cfg = transcoder.cfg
    pre = x @ transcoder.W_enc.T + transcoder.b_enc
    if cfg.activation == "topk":
        values, indices = pre.topk(cfg.k, dim=-1)
        latents = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    elif cfg.activation == "relu":
        latents = pre.relu()
    else:
        latents = pre * (pre > transcoder.threshold)
    out = latents @ transcoder.W_dec + transcoder.b_dec
    return out + x @ transcoder.W_skip.T if cfg.skip else out


def run_with_hand_written_hooks(model, transcoders: list[Transcoder], tokens: torch.Tensor) -> torch.Tensor:
    """Logits with `transcoders` spliced by hand-written hooks: capture each MLP module's
    own input with a PyTorch pre-hook (or the input site with a TL hook), replace the
    output site with a TL hook."""
    handles, fwd_hooks = [], []
    for transcoder in transcoders:
        cfg, captured = transcoder.cfg, {}
        if cfg.input_site.endswith("mlp.hook_in"):
            mlp = model.blocks[cfg.layer].mlp
            handles.append(mlp.register_forward_pre_hook(lambda m, args, c=captured: c.update(x=args[0])))
        else:
            fwd_hooks.append((cfg.input_site, lambda act, hook, c=captured: c.update(x=act)))
        fwd_hooks.append((cfg.output_site, lambda act, hook, c=captured, t=transcoder: by_hand(t, c["x"])))
    try:
        return model.run_with_hooks(tokens, fwd_hooks=fwd_hooks)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_error_term_reproduces_clean_logits(model, tokens, activation):
    transcoders = [make_transcoder(model, layer, activation=activation) for layer in range(3)]
    clean = model(tokens)
    with splice(model, transcoders, error_term=True):
        spliced = model(tokens)
    assert (spliced - clean).abs().max().item() <= 1e-5


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
@pytest.mark.parametrize("skip", [True, False])
def test_splice_equals_hand_written_hook(model, tokens, activation, skip):
    transcoder = make_transcoder(model, 1, activation=activation, skip=skip)
    expected = run_with_hand_written_hooks(model, [transcoder], tokens)
    with torch.no_grad(), splice(model, [transcoder]):
        spliced = model(tokens)
    assert torch.allclose(spliced, expected, atol=1e-5)
    assert not torch.allclose(spliced, model(tokens), atol=1e-3), "the splice changed nothing"


def test_splice_several_layers_at_once(model, tokens):
    transcoders = [make_transcoder(model, layer, seed=layer) for layer in (0, 2)]
    expected = run_with_hand_written_hooks(model, transcoders, tokens)
    with torch.no_grad(), splice(model, transcoders):
        assert torch.allclose(model(tokens), expected, atol=1e-5)


def test_no_hooks_left_after_the_block(model, tokens):
    transcoders = [make_transcoder(model, layer) for layer in range(3)]
    before = hook_state(model)
    with splice(model, transcoders):
        assert hook_state(model) != before
        model(tokens)
    assert hook_state(model) == before


def test_no_hooks_left_after_an_exception(model, tokens):
    transcoders = [make_transcoder(model, layer) for layer in range(3)]
    clean = model(tokens)
    before = hook_state(model)
    with pytest.raises(RuntimeError, match="inside"):
        with splice(model, transcoders):
            model(tokens)
            raise RuntimeError("inside the block")
    assert hook_state(model) == before
    assert torch.equal(model(tokens), clean)


def test_user_hooks_survive_the_splice(model, tokens):
    calls = []
    transcoder = make_transcoder(model, 0)
    # Count only passes on `tokens`: the splice's 2-token check pass also runs user hooks.
    model.add_hook("blocks.0.hook_resid_pre", lambda act, hook: calls.append(1) if act.shape[0] == 3 else None)
    try:
        with splice(model, [transcoder]):
            model(tokens)
        model(tokens)
        assert len(calls) == 2
    finally:
        model.reset_hooks()


def test_error_term_lets_gradients_reach_the_transcoders(model, tokens):
    transcoder = make_transcoder(model, 1)
    with splice(model, [transcoder], error_term=True):
        loss = model(tokens, return_type="loss")
    loss.backward()
    assert transcoder.W_enc.grad is not None and transcoder.W_enc.grad.abs().sum() > 0
    assert transcoder.W_skip.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_sae_on_the_mlp_output(model, tokens):
    site = "blocks.1.hook_mlp_out"
    sae = make_transcoder(model, 1, skip=False, input_site=site, output_site=site)
    assert sae.cfg.is_sae and sae.cfg.input_space == "any"
    expected = run_with_hand_written_hooks(model, [sae], tokens)
    with torch.no_grad(), splice(model, [sae]):
        assert torch.allclose(model(tokens), expected, atol=1e-5)


def test_transcoder_reading_ln2_normalized(model, tokens):
    from tl_transcoders.hooks.sites import input_space_of, probe_norm

    transcoder = make_transcoder(model, 1, input_site="blocks.1.ln2.hook_normalized")
    # before the norm's weight in every space, except TransformerLens 2.x LayerNorm: after it
    before_affine = probe_norm(model, "blocks.1.ln2").hook_before_affine
    assert transcoder.cfg.input_space == ("any" if before_affine else input_space_of(model, "blocks.1.mlp.hook_in"))
    expected = run_with_hand_written_hooks(model, [transcoder], tokens)
    with torch.no_grad(), splice(model, [transcoder]):
        assert torch.allclose(model(tokens), expected, atol=1e-5)


# --- bad input -----------------------------------------------------------------------


def test_layer_out_of_range(model):
    transcoder = make_transcoder(model, 1)
    transcoder.cfg.layer = 7
    transcoder.cfg.input_site = transcoder.cfg.output_site = None
    transcoder.cfg.__post_init__()
    with pytest.raises(SpliceError, match="layer 7 is out of range.*3 layers"):
        with splice(model, [transcoder]):
            pass


@pytest.mark.parametrize(
    "site, message",
    [
        (dict(output_site="blocks.0.hook_mlp_outt"), "does not exist.*blocks.0.hook_mlp_out"),
        (dict(input_site="blocks.0.hook_mlp_in"), "never fire.*set_use_hook_mlp_in|set_use_hook_mlp_in"),
    ],
    ids=["does-not-exist", "never-fires"],
)
def test_bad_site_is_refused_and_leaves_no_hooks(model, site, message):
    cfg = TranscoderConfig(d_in=16, d_out=16, d_latent=8, layer=0, k=2, **site)
    before = hook_state(model)
    with pytest.raises(SpliceError, match=message):
        with splice(model, [Transcoder(cfg)]):
            pass
    assert hook_state(model) == before


def test_width_mismatch_names_the_site(model):
    cfg = TranscoderConfig(d_in=24, d_out=16, d_latent=8, layer=0, k=2)
    with pytest.raises(SpliceError, match="d_in=24 but blocks.0.mlp.hook_in has width 16"):
        with splice(model, [Transcoder(cfg)]):
            pass


def test_input_space_mismatch():
    unfolded, folded = ("ht", "ht_folded") if "ht" in BACKENDS else ("bridge", "bridge_compat")
    transcoder = make_transcoder(build_model(f"{unfolded}-llama"), 1)
    assert transcoder.cfg.input_space == "unfolded_ln"
    with pytest.raises(SpliceError, match="input space 'unfolded_ln'.*'folded_ln'"):
        with splice(build_model(f"{folded}-llama"), [transcoder]):
            pass


def test_unknown_input_space_warns(model, tokens):
    transcoder = make_transcoder(model, 0)
    transcoder.cfg.input_space = None
    with pytest.warns(UserWarning, match="does not record its input space"):
        with splice(model, [transcoder]):
            model(tokens)


def test_transcoder_for_another_model(model):
    transcoder = make_transcoder(model, 0)
    transcoder.cfg.model_name = "some-other-model"
    with pytest.raises(SpliceError, match="trained on model 'some-other-model'"):
        with splice(model, [transcoder]):
            pass


def test_two_transcoders_on_one_site(model):
    with pytest.raises(SpliceError, match="both write blocks.1.hook_mlp_out"):
        with splice(model, [make_transcoder(model, 1), make_transcoder(model, 1, seed=1)]):
            pass


def test_site_in_another_block(model):
    cfg = TranscoderConfig(d_in=16, d_out=16, d_latent=8, layer=0, k=2, output_site="blocks.1.hook_mlp_out")
    with pytest.raises(SpliceError, match="in block 1, not in the transcoder's layer 0"):
        with splice(model, [Transcoder(cfg)]):
            pass


def test_input_site_after_output_site(model):
    cfg = TranscoderConfig(
        d_in=16,
        d_out=16,
        d_latent=8,
        layer=0,
        k=2,
        input_site="blocks.0.hook_resid_post",
        output_site="blocks.0.hook_mlp_out",
    )
    with pytest.raises(SpliceError, match="fires after the output site"):
        with splice(model, [Transcoder(cfg)]):
            pass


def test_bridge_mlp_input_site_is_a_hook_point(model):
    """The default input site is a real hook point on the Bridge and a module hook on
    HookedTransformer; both capture the tensor the MLP module receives."""
    assert ("blocks.0.mlp.hook_in" in model.hook_dict) == is_bridge(model)


def test_nan_weights_are_refused(model):
    transcoder = make_transcoder(model, 0)
    with torch.no_grad():
        transcoder.W_dec[0, 0] = float("nan")
    with pytest.raises(SpliceError, match=r"NaN or inf in \['W_dec'\]"):
        with splice(model, [transcoder]):
            pass


# --- no silent wrong results ----------------------------------------------------------


def test_one_transcoder_needs_no_list(model, tokens):
    transcoder = make_transcoder(model, 1)
    with splice(model, [transcoder]):
        expected = model(tokens)
    with splice(model, transcoder):
        assert torch.allclose(model(tokens), expected)


def test_a_nested_splice_of_the_same_site_is_refused(model, tokens):
    outer, inner = make_transcoder(model, 1, seed=0), make_transcoder(model, 1, seed=1)
    with splice(model, [outer]):
        with pytest.raises(SpliceError, match="already replaces"):
            with splice(model, [inner]):
                pass
        with splice(model, [make_transcoder(model, 2)]):  # another site may nest
            model(tokens)
    with splice(model, [inner]):  # the outer block has ended: the site is free again
        model(tokens)


def test_functions_needing_the_clean_model_refuse_to_run_inside_a_splice(model, tokens):
    from tl_transcoders import evaluate_splice
    from tl_transcoders.attribution import attribute

    transcoder = make_transcoder(model, 1)
    with splice(model, [transcoder]):
        with pytest.raises(SpliceError, match="needs the clean model"):
            evaluate_splice(model, [transcoder], tokens)
        with pytest.raises(SpliceError, match="needs the clean model"):
            attribute(model, [transcoder], tokens[0])


def test_a_batchtopk_transcoder_in_training_mode_splices_with_its_threshold(model, tokens):
    transcoder = make_transcoder(model, 1, activation="batchtopk")
    with splice(model, [transcoder]):
        expected = model(tokens)
    transcoder.train()
    with pytest.warns(UserWarning, match="BatchTopK transcoder in training mode"), splice(model, [transcoder]):
        assert torch.allclose(model(tokens), expected)
    assert transcoder.training, "its mode is restored after the splice"


def test_a_config_changed_after_construction_is_refused(model):
    transcoder = make_transcoder(model, 1)
    transcoder.cfg.k = 10_000
    with pytest.raises(SpliceError, match="k=10000 is larger than d_latent=48"):
        with splice(model, [transcoder]):
            pass
    other = make_transcoder(model, 1)
    other.W_skip = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(SpliceError, match=r"W_skip: \(3, 3\) \(config needs \(16, 16\)\)"):
        with splice(model, [other]):
            pass


def test_a_transcoder_from_a_dict_config(model, without_type_checker):
    original = make_transcoder(model, 1)
    rebuilt = Transcoder(original.cfg.to_dict())
    assert rebuilt.cfg == original.cfg
    with pytest.raises(SpliceError, match="expected Transcoder or CrossLayerTranscoder objects, got a dict"):
        with splice(model, [original.cfg.to_dict()]):
            pass
    with pytest.raises(SpliceError, match="got the path"):
        with splice(model, "transcoders/layer_1"):
            pass
