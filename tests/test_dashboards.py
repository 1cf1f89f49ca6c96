"""Feature dashboards: streamed records against a brute-force pass over all tokens."""

from __future__ import annotations

import dataclasses
import json
from html.parser import HTMLParser

import pytest
import torch
from conftest import MODEL_PARAMS, build_model, make_transcoder

from tl_transcoders import Transcoder
from tl_transcoders.analysis.dashboards import (
    collect_activations,
    dashboard_page,
    latent_dashboard,
    latent_dashboards,
    latents_across_frequencies,
    save_dashboards,
    top_latents,
)
from tl_transcoders.attribution.virtual_weights import embedding_weights, logit_weights
from tl_transcoders.hooks.sites import capture, is_bridge

# one HookedTransformer (where TransformerLens has it) and one Bridge
NAMES = ["ht-gpt2" if "ht-gpt2" in MODEL_PARAMS else "bridge_compat-gpt2", "bridge-llama"]
LAYER = 1
BEFORE, AFTER = 5, 2


@pytest.fixture(params=NAMES)
def model(request):
    return build_model(request.param)


def token_rows(model, n_rows=4, n_pos=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (n_rows, n_pos), generator=generator)


def dense_activations(model, transcoder, tokens):
    """Every latent's activation on every token `[rows, pos, d_latent]`, in one pass."""
    site = transcoder.cfg.input_site
    with torch.no_grad():
        x = capture(model, tokens, [site])[site]
        return transcoder.encode(x).view(*tokens.shape, -1)


def brute_force(acts, tokens, latent, n_top):
    """Top activations of `latent` by a full sort over all tokens (position 0 left
    out, ties to the earlier token), with windows read position by position."""
    acts = acts[..., latent].clone()
    acts[:, 0] = 0
    n_rows, n_pos = tokens.shape
    flat = acts.reshape(-1)
    order = torch.sort(-flat, stable=True).indices
    order = order[flat[order] > 0][:n_top]
    out = []
    for index in order.tolist():
        row, position = divmod(index, n_pos)
        window_tokens, window_acts = [], []
        for q in range(position - BEFORE, position + AFTER + 1):
            inside = 0 <= q < n_pos
            window_tokens.append(int(tokens[row, q]) if inside else -1)
            window_acts.append(float(acts[row, q]) if inside else 0.0)
        out.append((float(flat[index]), row, position, window_tokens, window_acts))
    return out


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_records_match_brute_force(model, activation):
    transcoder = make_transcoder(model, LAYER, activation, d_latent=24, k=4)
    tokens = token_rows(model)
    n_top = 5
    records = collect_activations(
        model, transcoder, tokens, n_top=n_top, n_bins=16, window_before=BEFORE, window_after=AFTER
    )
    acts = dense_activations(model, transcoder, tokens)
    fired = acts[:, 1:] > 0
    assert records.n_tokens == tokens.shape[0] * (tokens.shape[1] - 1)
    assert torch.equal(records.fire_counts, fired.sum((0, 1)))
    assert torch.equal(records.hist_counts.sum(1), records.fire_counts)
    assert (records.fire_counts > 0).sum() > 10  # the check below covers many latents
    for latent in range(24):
        expected = brute_force(acts, tokens, latent, n_top)
        for j in range(n_top):
            got = (
                float(records.top_values[latent, j]),
                int(records.top_rows[latent, j]),
                int(records.top_positions[latent, j]),
                records.window_tokens[latent, j].tolist(),
                records.window_activations[latent, j].tolist(),
            )
            if j >= len(expected):
                assert got[:3] == (0.0, -1, -1)
                continue
            assert got[1:4] == expected[j][1:4]
            assert got[0] == pytest.approx(expected[j][0], rel=1e-6)
            assert got[4] == pytest.approx(expected[j][4], rel=1e-6)
        values = acts[:, 1:, latent][fired[..., latent]]
        if values.numel():
            edges, counts = records.histogram(latent)
            top = edges[-1] * 16 / len(counts)  # the full range 2^e before trimming
            assert top / 2 <= values.max() < top
            reference = torch.histogram(values.double(), torch.tensor(edges, dtype=torch.float64))
            assert counts == reference.hist.long().tolist()


def test_subset_and_bos(model):
    transcoder = make_transcoder(model, LAYER, "relu", d_latent=24)
    tokens = token_rows(model)
    full = collect_activations(model, transcoder, tokens, n_top=4, skip_bos=False)
    chosen = [17, 3, 0]
    subset = collect_activations(model, transcoder, tokens, n_top=4, latents=chosen, skip_bos=False)
    acts = dense_activations(model, transcoder, tokens)
    assert full.n_tokens == tokens.numel()
    assert torch.equal(full.fire_counts, (acts > 0).sum((0, 1)))
    assert subset.latents.tolist() == chosen
    for name in (
        "top_values",
        "top_rows",
        "top_positions",
        "window_tokens",
        "window_activations",
        "fire_counts",
        "hist_counts",
        "hist_exponents",
    ):
        assert torch.equal(getattr(subset, name), getattr(full, name)[chosen]), name


def test_streaming_equals_one_batch(model):
    transcoder = make_transcoder(model, LAYER, "topk", d_latent=24, k=4)
    tokens = token_rows(model, n_rows=5)
    whole = collect_activations(model, transcoder, tokens, n_top=6, n_bins=8)
    streamed = collect_activations(model, transcoder, iter([tokens[:1], tokens[1:3], tokens[3:]]), n_top=6, n_bins=8)
    for field in dataclasses.fields(whole):
        a, b = getattr(whole, field.name), getattr(streamed, field.name)
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), field.name
        else:
            assert a == b, field.name


def test_top_latents():
    model = build_model(NAMES[0])
    transcoder = make_transcoder(model, LAYER, "topk", d_latent=48, k=2)
    records = collect_activations(model, transcoder, token_rows(model, n_rows=2, n_pos=6))
    counts, maxima = records.fire_counts, records.top_values[:, 0]
    assert (counts == 0).any()  # some dead latents to leave out
    frequent = top_latents(records, "frequency", n=100)
    assert sorted(frequent) == (counts > 0).nonzero()[:, 0].tolist()
    assert counts[frequent].tolist() == sorted(counts[frequent].tolist(), reverse=True)
    strongest = top_latents(records, "max_activation", n=3)
    assert strongest == maxima.topk(3).indices.tolist()
    with pytest.raises(ValueError, match="frequency"):
        top_latents(records, "loudest")


def test_latents_across_frequencies_draws_from_the_band_and_sets_the_densest_apart():
    model = build_model(NAMES[0])
    transcoder = make_transcoder(model, LAYER, "topk", d_latent=48, k=4)
    records = collect_activations(model, transcoder, token_rows(model, n_rows=4, n_pos=8))
    frequency = records.fire_counts.double() / records.n_tokens
    alive = sorted(set(frequency.nonzero()[:, 0].tolist()))
    low, high = sorted(frequency[alive].tolist())[len(alive) // 4], sorted(frequency[alive].tolist())[len(alive) // 2]
    in_band = [i for i in alive if low <= frequency[i] <= high]
    densest_expected = sorted(alive, key=lambda i: -frequency[i])[:2]
    spread, densest = latents_across_frequencies(records, n=3, band=(low, high), n_densest=2, seed=1)
    assert sorted(densest) == sorted(densest_expected) and not set(spread) & set(densest)
    assert len(spread) == 3 and set(spread) <= set(in_band) - set(densest)
    assert [frequency[i] for i in spread] == sorted(frequency[i] for i in spread)
    draws = {tuple(latents_across_frequencies(records, n=3, band=(low, high), seed=s)[0]) for s in range(8)}
    assert len(draws) > 1  # drawn at random, not the same three each time
    # More wanted than the band holds: the rest are the latents nearest to it.
    everything, _ = latents_across_frequencies(records, n=len(alive), band=(low, low), n_densest=0)
    assert sorted(everything) == alive
    assert frequency[everything[0]] == min(frequency[alive])
    with pytest.raises(ValueError, match="band"):
        latents_across_frequencies(records, band=(0.5, 0.1))


def test_weight_views_match_virtual_weights(model):
    transcoder = make_transcoder(model, LAYER, "topk", d_latent=24, k=4)
    records = collect_activations(model, transcoder, token_rows(model), n_top=3)
    latents = top_latents(records, n=2)
    dashes = latent_dashboards(records, latents, model, transcoder, k_tokens=4)
    for latent, dash in zip(latents, dashes):
        assert dash.latent == latent
        logits = logit_weights(model, transcoder, [latent])[0]
        top, bottom = logits.topk(4), (-logits).topk(4)
        assert [e.token_id for e in dash.logit_effects["positive"]] == top.indices.tolist()
        assert [e.value for e in dash.logit_effects["positive"]] == pytest.approx(top.values.tolist())
        assert [e.token_id for e in dash.logit_effects["negative"]] == bottom.indices.tolist()
        assert [e.value for e in dash.logit_effects["negative"]] == pytest.approx((-bottom.values).tolist())
        de = embedding_weights(model, transcoder, [latent])[:, 0].topk(4)
        assert [e.token_id for e in dash.de_embedding] == de.indices.tolist()
        assert [e.value for e in dash.de_embedding] == pytest.approx(de.values.tolist())
        if not is_bridge(model) and model.cfg.normalization_type == "LN":
            # HookedTransformer with LayerNorm: centre(W_dec[latent]) . (w_final * W_U)
            d = transcoder.W_dec[latent].detach()
            by_hand = (d - d.mean()) @ (model.ln_final.w.detach()[:, None] * model.W_U.detach())
            torch.testing.assert_close(logits, by_hand, rtol=1e-5, atol=1e-5)


def test_sae_on_the_residual_stream_has_no_weight_views():
    model = build_model(NAMES[0])
    site = f"blocks.{LAYER}.hook_resid_pre"
    sae = make_transcoder(model, LAYER, "relu", skip=False, d_latent=8, input_site=site, output_site=site)
    records = collect_activations(model, sae, token_rows(model, n_rows=2), n_top=2)
    dash = latent_dashboard(records, top_latents(records, n=1)[0], model, sae)
    assert dash.contexts and dash.logit_effects == {} and dash.de_embedding == []
    assert "hook_resid_pre" in dash.notes[0] and "hook_resid_pre" in dash.to_html()


class FakeTokenizer:
    """Token strings that need escaping and visible whitespace."""

    PIECES = ["<b>", " a&b", "\n", "  ", "\"q'"]

    def decode(self, ids):
        return "".join(f"{self.PIECES[i % 5]}{i}" if i % 5 not in (2, 3) else self.PIECES[i % 5] for i in ids)


class PageParser(HTMLParser):
    """Checks that tags are balanced and collects the text and title of token spans."""

    VOID = {"br", "meta"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.contexts, self.in_token, self.ids = [], [], False, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag in self.VOID:
            return
        self.stack.append(tag)
        css = attrs.get("class", "")
        if css == "tlt-ctx":
            self.contexts.append([])
        if tag == "span" and css.startswith("tok"):
            self.in_token = True
            self.contexts[-1].append({"text": "", "title": attrs["title"], "top": css == "tok top"})

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"
        self.in_token = False

    def handle_data(self, data):
        if self.in_token:
            self.contexts[-1][-1]["text"] += data


def unvisible(text):
    for glyph, char in (("↵", "\n"), ("⇥", "\t"), ("␍", "\r"), ("␣", " ")):
        text = text.replace(glyph, char)
    return text


def test_html_shows_every_token_escaped(tmp_path):
    model = build_model(NAMES[0])
    transcoder = make_transcoder(model, LAYER, "topk", d_latent=24, k=4)
    records = collect_activations(model, transcoder, token_rows(model), n_top=4)
    latents = top_latents(records, n=2)
    dashes = latent_dashboards(records, latents, model, transcoder, tokenizer=FakeTokenizer())
    dash = dashes[0]
    assert len(dash.contexts) == 4
    text = dash.to_html()
    assert dash._repr_html_() == text
    assert "<b>" not in text and "&lt;b&gt;" in text and "<script" not in text
    parser = PageParser()
    parser.feed(text)
    parser.close()
    assert parser.stack == []
    assert len(parser.contexts) == len(dash.contexts)
    slot = records.slot(dash.latent)
    for j, (spans, context) in enumerate(zip(parser.contexts, dash.contexts)):
        assert [unvisible(s["text"]) for s in spans] == context.tokens
        assert [s["top"] for s in spans].index(True) == context.top_index
        assert sum(s["top"] for s in spans) == 1
        assert [float(s["title"].split()[-1]) for s in spans] == context.activations
        assert context.activations[context.top_index] == context.value
        assert context.value == float(records.top_values[slot, j])
    assert json.loads(json.dumps(dash.to_dict()))["contexts"][0]["tokens"] == dash.contexts[0].tokens

    page = dashboard_page(dashes, "Layer <1>")
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert parser.stack == [] and "<title>Layer &lt;1&gt;</title>" in page
    for d in dashes:
        assert d.anchor in parser.ids and f'href="#{d.anchor}"' in page
    path = save_dashboards(tmp_path / "out" / "dashboards.html", dashes, "Layer <1>")
    assert path.read_text(encoding="utf-8") == page
    data = json.loads(save_dashboards(tmp_path / "dashboards.json", dashes).read_text())
    assert [d["latent"] for d in data["dashboards"]] == latents
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dashboards.html", "dashboards.json", "out"]


def test_ids_without_tokenizer():
    model = build_model(NAMES[1])
    transcoder = make_transcoder(model, LAYER, "relu", d_latent=8)
    records = collect_activations(model, transcoder, token_rows(model, n_rows=2), n_top=2)
    dash = latent_dashboard(records, top_latents(records, n=1)[0], tokenizer=None)
    assert dash.contexts and all(c.tokens == [str(i) for i in c.token_ids] for c in dash.contexts)
    assert dash.logit_effects == {} and dash.de_embedding == []
    assert "Latent" in dash.to_html()


def test_clear_errors():
    model = build_model(NAMES[0])
    transcoder = make_transcoder(model, LAYER, "topk", d_latent=24, k=4)
    tokens = token_rows(model, n_rows=2)
    with pytest.raises(ValueError, match="out of range"):
        collect_activations(model, transcoder, tokens, latents=[3, 24])
    with pytest.raises(ValueError, match="integers"):
        collect_activations(model, transcoder, tokens.float())
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        collect_activations(model, transcoder, tokens[0])
    with pytest.raises(ValueError, match="n_top"):
        collect_activations(model, transcoder, tokens, n_top=0)
    wide = dataclasses.replace(transcoder.cfg, d_in=2 * model.cfg.d_model)
    with pytest.raises(ValueError, match="d_in=32"):
        collect_activations(model, Transcoder(wide), tokens)
    records = collect_activations(model, transcoder, tokens, latents=[1, 2])
    with pytest.raises(ValueError, match="out of range"):
        latent_dashboard(records, 24)
    with pytest.raises(ValueError, match="not recorded"):
        latent_dashboard(records, 5)
    other = make_transcoder(model, 2, "topk", d_latent=24, k=4)
    with pytest.raises(ValueError, match="collected with"):
        latent_dashboard(records, 1, model, other)
    with pytest.raises(ValueError, match="both"):
        latent_dashboard(records, 1, model)
