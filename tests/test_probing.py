"""probing: k-sparse probes on planted synthetic features, the logistic fit against its
optimality condition, labels from token strings and sources, and features collected
from a model against TransformerLens's own cache."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_transcoder

from tl_transcoders.analysis.autointerp import latent_activations
from tl_transcoders.analysis.probing import (
    ProbeError,
    collect_features,
    probe_dictionaries,
    select_features,
    sequence_labels,
    sparse_probe,
    split_mask,
    token_class_labels,
    token_classes,
    token_sequences,
)

PLANTED = 17


def planted(n: int = 400, d: int = 50, seed: int = 0):
    """Sparse non-negative noise features; feature PLANTED fires (about 1-2) exactly on
    the positive samples."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.rand(n, generator=g) < 0.5
    features = torch.relu(torch.randn(n, d, generator=g) - 1.0)
    features[:, PLANTED] = labels * (1 + torch.rand(n, generator=g))
    return features, labels


def test_k1_finds_the_planted_feature():
    features, labels = planted()
    result = sparse_probe(features, labels, k=1)
    assert result.features == [PLANTED]
    assert result.accuracy == result.balanced_accuracy == 1.0
    assert result.n_train + result.n_test == len(labels)
    noise = sparse_probe(features[:, [3]], labels, k=1)
    assert 0.35 < noise.balanced_accuracy < 0.65
    assert sparse_probe(features, labels, k=3).features[0] == PLANTED


def test_probe_is_deterministic_and_uses_the_given_split():
    features, labels = planted(seed=1)
    noisy = features + 2 * torch.randn(features.shape, generator=torch.Generator().manual_seed(2))
    a = sparse_probe(noisy, labels, k=4, seed=3)
    b = sparse_probe(noisy, labels, k=4, seed=3)
    assert a.to_dict() == b.to_dict()
    mask = split_mask(labels, 0.5, seed=9)
    c = sparse_probe(noisy, labels.long(), k=4, test_mask=mask)
    assert c.n_test == int(mask.sum()) and c.to_dict() != a.to_dict()


def test_logistic_fit_is_at_the_optimum():
    """The returned weights zero the gradient of the objective (balanced mean log-loss
    + l2 |w|^2 on standardised training features), computed here with autograd."""
    features, labels = planted(seed=4)
    noisy = features + 2 * torch.randn(features.shape, generator=torch.Generator().manual_seed(5))
    l2 = 1e-2
    mask = split_mask(labels, 0.25, seed=0)
    result = sparse_probe(noisy, labels, k=3, test_mask=mask, l2=l2)
    train = ~mask
    x = noisy[train][:, result.features].double()
    x = (x - x.mean(0)) / x.std(0, unbiased=False)
    y = labels[train]
    weight = torch.where(y, len(y) / (2 * y.sum()), len(y) / (2 * (~y).sum())).double()
    w = torch.tensor(result.weights, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(result.bias, dtype=torch.float64, requires_grad=True)
    logits = x @ w + b
    loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(logits, y.double(), reduction="none")).mean()
    (loss + l2 * (w * w).sum()).backward()
    assert w.grad.abs().max() < 1e-6 and b.grad.abs() < 1e-6


def test_selection_rules(without_type_checker):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2 == 0
    big_weak = 100 * torch.randn(200, generator=g) + 55 * labels  # |mean diff| about 55, t about 0.55
    small_strong = 0.1 * torch.randn(200, generator=g) + labels  # |mean diff| 1, t about 10
    features = torch.stack([big_weak, small_strong], dim=1)
    assert select_features(features, labels, 1, "mean_diff").tolist() == [0]
    assert select_features(features, labels, 1, "t_stat").tolist() == [1]
    with pytest.raises(ProbeError, match="selection"):
        select_features(features, labels, 1, "nope")


def test_split_mask_is_stratified_and_seeded():
    labels = torch.tensor([0] * 30 + [1] * 10)
    mask = split_mask(labels, 0.2, seed=0)
    assert int(mask[:30].sum()) == 6 and int(mask[30:].sum()) == 2
    assert torch.equal(mask, split_mask(labels, 0.2, seed=0))
    assert not torch.equal(mask, split_mask(labels, 0.2, seed=1))
    assert int(split_mask(torch.tensor([0, 0, 1, 1]), 0.01)[2:].sum()) == 1  # at least one per class


def test_bad_probe_input_is_refused():
    features, labels = planted(n=40)
    with pytest.raises(ProbeError, match="39 labels for 40"):
        sparse_probe(features, labels[:-1], k=1)
    with pytest.raises(ProbeError, match="single class"):
        sparse_probe(features, torch.ones(40, dtype=torch.bool), k=1)
    with pytest.raises(ProbeError, match="3 classes"):
        sparse_probe(features, torch.arange(40) % 3, k=1)
    with pytest.raises(ProbeError, match="k must be"):
        sparse_probe(features, labels, k=0)
    with pytest.raises(ProbeError, match="k must be"):
        sparse_probe(features, labels, k=51)
    with pytest.raises(ProbeError, match="NaN"):
        sparse_probe(features.clone().fill_(float("nan")), labels, k=1)
    with pytest.raises(ProbeError, match="test_mask"):
        sparse_probe(features, labels, k=1, test_mask=torch.zeros(3, dtype=torch.bool))


def test_token_classes_from_strings():
    strings = [" The", "123", ",", "\n", "dog", " 4", "!)", " ", "Hello"]
    classes = {
        name: [s for s, m in zip(strings, member.tolist()) if m] for name, member in token_classes(strings).items()
    }
    assert classes["digits"] == ["123", " 4"]
    assert classes["punctuation"] == [",", "!)"]
    assert classes["capitalised"] == [" The", "Hello"]
    assert classes["space_leading"] == [" The", " 4", " "]
    assert classes["newline"] == ["\n"]
    assert classes["word"] == [" The", "dog", "Hello"]


def test_token_class_labels_with_a_fake_tokenizer():
    vocab = [" the", " Cat", "7", ".", "\n"]

    class Tokenizer:
        def decode(self, ids):
            return "".join(vocab[i] for i in ids)

    tokens = torch.tensor([[0, 1, 2, 3], [4, 2, 2, 1]])
    for tokenizer in (Tokenizer(), lambda ids: [vocab[i] for i in ids]):
        labels = token_class_labels(tokens, tokenizer)
        assert labels["digits"].tolist() == [[False, False, True, False], [False, True, True, False]]
        assert labels["capitalised"].tolist() == [[False, True, False, False], [False, False, False, True]]
        assert labels["newline"].tolist() == [[False, False, False, False], [True, False, False, False]]


def test_sequence_labels_and_token_sequences():
    records = [
        {"text": "a b c d e f g", "source": "bible_web"},
        {"text": "x y", "source": "linux_doc"},
        {"text": "p q r s t", "source": "linux_doc"},
        {"text": "h i j k", "source": "bible_web"},
    ]
    vocab: dict[str, int] = {}
    encode = lambda text: [vocab.setdefault(w, len(vocab) + 1) for w in text.split()]  # noqa: E731
    tokens, sources = token_sequences(records, encode, seq_len=3, per_source=2, bos=0)
    # bible: "a b", "c d" (cap 2); linux: "x y", "p q", ("r s" over the cap)
    assert sources == ["bible_web", "bible_web", "linux_doc", "linux_doc"]
    assert tokens[:, 0].tolist() == [0] * 4 and tokens[0, 1:].tolist() == encode("a b")
    assert tokens[3, 1:].tolist() == encode("p q")
    tasks = sequence_labels(sources)
    assert tasks["prose"].tolist() == [True, True, False, False]
    assert tasks["source=linux_doc"].tolist() == [False, False, True, True]
    with pytest.raises(ProbeError, match="long enough"):
        token_sequences(records, encode, seq_len=20, per_source=1)


def test_collect_features_match_the_model_cache(model, tokens):
    site = "blocks.0.mlp.hook_post"
    transcoder = make_transcoder(model, 1, activation="relu")
    # an SAE on the same layer's MLP output writes the transcoder's output site: reading both is fine
    sae = make_transcoder(model, 1, skip=False, input_site="blocks.1.hook_mlp_out", output_site="blocks.1.hook_mlp_out")
    positions = torch.tensor([[2, 5], [0, 1], [1, 11], [2, 5]])
    got = collect_features(model, tokens, {"neurons": site, "tc": transcoder, "sae": sae}, positions, batch_size=2)
    _, cache = model.run_with_cache(tokens)
    neurons = cache[site].float()
    assert torch.allclose(got["neurons"][0], neurons[:, 1:].mean(1), atol=1e-5)
    assert torch.allclose(got["neurons"][1], neurons[positions[:, 0], positions[:, 1]], atol=1e-5)
    latents = latent_activations(model, transcoder, tokens, list(range(48))).permute(1, 2, 0)
    assert torch.allclose(got["tc"][0], latents[:, 1:].mean(1), atol=1e-5)
    assert torch.allclose(got["tc"][1], latents[positions[:, 0], positions[:, 1]], atol=1e-5)
    sae_latents = latent_activations(model, sae, tokens, list(range(48))).permute(1, 2, 0)
    assert torch.allclose(got["sae"][1], sae_latents[positions[:, 0], positions[:, 1]], atol=1e-5)
    with pytest.raises(ProbeError, match="inside tokens"):
        collect_features(model, tokens, {"neurons": site}, torch.tensor([[3, 0]]))


def test_probe_dictionaries_table(model):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (12, 10), generator=g)
    transcoder = make_transcoder(model, 0, activation="relu")
    feature_sets = {"neurons": "blocks.0.mlp.hook_post", "transcoder": transcoder}
    sequence_tasks = {"first_half": torch.arange(12) < 6, "one": torch.arange(12) == 0}
    token_tasks = {"small_id": tokens < model.cfg.d_vocab // 2, "never": torch.zeros_like(tokens, dtype=torch.bool)}
    kwargs = dict(ks=(1, 3), tokens_per_class=20, seed=1)
    table = probe_dictionaries(model, tokens, feature_sets, sequence_tasks, token_tasks, **kwargs)
    assert table == probe_dictionaries(model, tokens, feature_sets, sequence_tasks, token_tasks, **kwargs)
    json.dumps(table)
    tasks = table["tasks"]
    assert "too few" in tasks["one"]["skipped"] and "too few" in tasks["never"]["skipped"]
    assert tasks["small_id"]["n"] == 40 and tasks["small_id"]["n_positive"] == 20
    for task in ("first_half", "small_id"):
        for name in feature_sets:
            assert set(tasks[task]["scores"][name]) == {"1", "3"}
            assert all(0 <= v <= 1 for v in tasks[task]["scores"][name].values())
            assert len(tasks[task]["features"][name]["3"]) == 3
    assert table["mean"]["neurons"]["1"] == pytest.approx(
        (tasks["first_half"]["scores"]["neurons"]["1"] + tasks["small_id"]["scores"]["neurons"]["1"]) / 2
    )
    with pytest.raises(ProbeError, match="labels"):
        probe_dictionaries(model, tokens, feature_sets, {"bad": torch.zeros(5, dtype=torch.bool)})


def test_probe_dictionaries_averages_over_splits(model):
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, model.cfg.d_vocab, (40, 4), generator=g)
    site = "blocks.0.mlp.hook_post"
    labels = tokens[:, 1] < model.cfg.d_vocab // 2  # partly visible in the pooled neurons
    table = probe_dictionaries(model, tokens, {"neurons": site}, {"even": labels}, ks=(2,), seed=5, n_splits=3)
    pooled, _ = collect_features(model, tokens, {"neurons": site})["neurons"]
    expected = [sparse_probe(pooled, labels, 2, split_mask(labels, 0.2, seed)).balanced_accuracy for seed in (5, 6, 7)]
    assert len(set(expected)) > 1  # the splits differ, so the mean is not any one of them
    task = table["tasks"]["even"]
    assert task["scores"]["neurons"]["2"] == pytest.approx(sum(expected) / 3)
    assert task["n_test"] == 8 and table["n_splits"] == 3
    with pytest.raises(ProbeError, match="n_splits"):
        probe_dictionaries(model, tokens, {"neurons": site}, {"even": labels}, n_splits=0)
