"""Sparse probing: how well k features of a dictionary predict a known property.

An offline interpretability measure that needs no LLM (the sparse-probing evaluation of
SAEBench, after Gurnee et al. 2023): for a binary task, rank the features by how well
they separate the two classes on the training split, keep the top k, fit a logistic
regression on those k alone and report held-out accuracy. A dictionary whose latents
line up with properties of the text reaches a high accuracy with k = 1 or 2; the
model's own MLP neurons (`blocks.L.mlp.hook_post`) are the usual baseline.

Labels that come free with a corpus:
- sequence level (features mean-pooled over a sequence): the record's source, one
  task per source (that source vs the rest), and prose vs technical documentation
  (`sequence_labels`; the sources of the offline corpus are listed in `PROSE_SOURCES`);
- token level: classes of the token's own text (`token_classes`: digits, punctuation,
  capitalised words, tokens starting with a space or a newline, ...).

`probe_dictionaries` collects the features of several feature sets in one pass per
batch and returns a JSON-ready table of accuracy per task x k x feature set.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor, nn

from tl_transcoders.analysis.dashboards import token_strings
from tl_transcoders.analysis.errors import AnalysisError, check_finite_activations
from tl_transcoders.core.errors import check_at_least
from tl_transcoders.core.transcoder import Transcoder
from tl_transcoders.hooks.sites import capture, check_site_exists
from tl_transcoders.hooks.splice import check_compatible
from tl_transcoders.hooks.tokens import TokenInput, token_batches_of

__all__ = [
    "FeatureSource",
    "PROSE_SOURCES",
    "ProbeError",
    "ProbeResult",
    "Selection",
    "TOKEN_CLASSES",
    "collect_features",
    "probe_dictionaries",
    "select_features",
    "sequence_labels",
    "sparse_probe",
    "split_mask",
    "token_class_labels",
    "token_classes",
    "token_sequences",
]

Selection = Literal["mean_diff", "t_stat"]
"""How `select_features` ranks features."""

PROSE_SOURCES = ("bible_web", "henry_mhcc", "spurgeon_tdavid", "fortunes")
"""Sources of the offline corpus that are prose; the others (linux_doc, python_doc,
perl_doc, postgres_doc, django_doc, git_doc, debian_handbook) are technical
documentation with code and markup."""


class ProbeError(AnalysisError):
    """Probe inputs that cannot be used (shapes, classes, k)."""


# --- probes -----------------------------------------------------------------------


@dataclass
class ProbeResult:
    """A k-sparse probe: a logistic regression on k chosen features, scored on held-out
    samples."""

    features: list[int]
    """The chosen features, best first."""
    weights: list[float]
    """The regression's weight on each feature, in standardised units (the feature minus
    its training mean, over its training std)."""
    bias: float
    """The regression's intercept."""
    accuracy: float
    """Fraction of held-out samples classified right."""
    balanced_accuracy: float
    """Held-out accuracy averaged over the classes (recall per class), 0.5 by chance for two."""
    n_train: int
    """Samples the probe was fitted on."""
    n_test: int
    """Held-out samples it was scored on."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_mask(labels: Shaped[Tensor, " n"], test_fraction: float = 0.2, seed: int = 0) -> Bool[Tensor, " n"]:
    """A stratified random split: True marks test samples. Each class puts
    round(test_fraction * its size) samples, at least 1 and at most size - 1, in the
    test set, chosen by a permutation from a generator seeded with `seed`."""
    if not 0 < test_fraction < 1:
        raise ProbeError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(labels), dtype=torch.bool)
    for value in labels.unique(sorted=True):
        members = (labels == value).nonzero()[:, 0]
        n = min(max(round(test_fraction * len(members)), 1), len(members) - 1)
        test[members[torch.randperm(len(members), generator=generator)[:n]]] = True
    return test


def select_features(
    features: Float[Tensor, "n d"], labels: Bool[Tensor, " n"], k: int, selection: Selection = "mean_diff"
) -> Int[Tensor, " n_chosen"]:
    """The k features that best separate the classes, best first (ties: lower index).

    "mean_diff" (SAEBench): |mean over positives - mean over negatives|. "t_stat": the
    same over the pooled within-class standard deviation, which ignores each feature's
    scale."""
    x = features.double()
    pos, neg = x[labels], x[~labels]
    score = (pos.mean(0) - neg.mean(0)).abs()
    if selection == "t_stat":
        pooled = ((pos.var(0, unbiased=False) * len(pos) + neg.var(0, unbiased=False) * len(neg)) / len(x)).sqrt()
        score = score / pooled.clamp_min(1e-12)
    elif selection != "mean_diff":
        raise ProbeError(f"selection must be 'mean_diff' or 't_stat', got {selection!r}")
    return torch.sort(-score, stable=True).indices[:k]


def sparse_probe(
    features: Float[Tensor, "n d"],
    labels: Shaped[Tensor, " n_labels"],
    k: int,
    test_mask: Bool[Tensor, " n_mask"] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    selection: Selection = "mean_diff",
    l2: float = 1e-3,
    max_iter: int = 200,
) -> ProbeResult:
    """Fit and test a k-sparse logistic-regression probe for a binary task.

    `labels` has two distinct values (bool or integers; the larger is the positive
    class). `test_mask` (True = test) is the split, else `split_mask(labels,
    test_fraction, seed)`. On the training split only: the top-k features by
    `select_features`, their standardisation, and a logistic regression with balanced
    class weights and an `l2` penalty on the weights, fitted by L-BFGS in float64 (so
    the result is deterministic)."""
    features, labels, test_mask = _check_probe_input(features, labels, k, test_mask)
    if test_mask is None:
        test_mask = split_mask(labels, test_fraction, seed)
    train = ~test_mask
    if labels[train].unique().numel() < 2 or labels[test_mask].unique().numel() < 2:
        raise ProbeError("both the training and the test split need samples of both classes")
    chosen = select_features(features[train], labels[train], k, selection)
    x = features[:, chosen].double()
    mean, std = x[train].mean(0), x[train].std(0, unbiased=False)
    x = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
    w, b = _fit_logistic(x[train], labels[train], l2, max_iter)
    predicted = (x[test_mask] @ w + b) > 0
    truth = labels[test_mask]
    tpr = (predicted & truth).sum() / truth.sum()
    tnr = (~predicted & ~truth).sum() / (~truth).sum()
    return ProbeResult(
        chosen.tolist(),
        w.tolist(),
        float(b),
        float((predicted == truth).double().mean()),
        float((tpr + tnr) / 2),
        int(train.sum()),
        int(test_mask.sum()),
    )


def _check_probe_input(features: Tensor, labels: Tensor, k: int, test_mask: Tensor | None):
    if len(labels) != len(features):
        raise ProbeError(f"{len(labels)} labels for {len(features)} feature rows: give one label per row")
    if test_mask is not None and len(test_mask) != len(features):
        raise ProbeError(f"test_mask has {len(test_mask)} entries for {len(features)} feature rows")
    if not 1 <= k <= features.shape[1]:
        raise ProbeError(f"k must be between 1 and the number of features {features.shape[1]}, got {k}")
    if not torch.isfinite(features).all():
        raise ProbeError("features contain NaN or infinite values")
    classes = labels.cpu().unique(sorted=True)
    if classes.numel() != 2:
        what = "a single class" if classes.numel() < 2 else f"{classes.numel()} classes"
        raise ProbeError(
            f"a probe needs exactly two classes, got {what}; for several classes make one task per class (labels == c)"
        )
    labels = labels.cpu() == classes[1]
    return features.cpu(), labels, None if test_mask is None else test_mask.cpu()


def _fit_logistic(x: Tensor, y: Tensor, l2: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """Weights and bias of a class-balanced, L2-penalised logistic regression (mean
    loss + l2 * |w|^2), by full-batch L-BFGS from zero."""
    n_pos = y.sum()
    sample_weight = torch.where(y, len(y) / (2 * n_pos), len(y) / (2 * (len(y) - n_pos))).double()
    sign = y.double() * 2 - 1
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = (sample_weight * F.softplus(-sign * (x @ w + b))).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), b.detach()


# --- labels -----------------------------------------------------------------------

TOKEN_CLASSES: dict[str, Callable[[str], bool]] = {
    "digits": lambda t: t.strip() != "" and t.strip().isdigit(),
    "punctuation": lambda t: t.strip() != "" and all(unicodedata.category(c)[0] in "PS" for c in t.strip()),
    "capitalised": lambda t: t.strip()[:1].isupper() and t.strip().isalpha(),
    "space_leading": lambda t: t.startswith(" "),
    "newline": lambda t: "\n" in t,
    "word": lambda t: t.strip().isalpha(),
}
"""Token classes read from a token's own text (as decoded alone): all digits; all
punctuation or symbols; a capitalised alphabetic word; starting with a space;
containing a newline; alphabetic. Surrounding whitespace is ignored except where the
class is about whitespace."""


def token_classes(strings: Sequence[str]) -> dict[str, Bool[Tensor, " n"]]:
    """For each class of `TOKEN_CLASSES`, which of the token strings belong to it."""
    return {
        name: torch.tensor([bool(rule(s)) for s in strings], dtype=torch.bool) for name, rule in TOKEN_CLASSES.items()
    }


def token_class_labels(tokens: Int[Tensor, "n pos"], tokenizer: Any) -> dict[str, Bool[Tensor, "n pos"]]:
    """`token_classes` of every token of `tokens`; `tokenizer` decodes ids (anything
    with `decode`, or a function from a list of ids to their strings)."""
    ids = tokens.cpu().unique()
    strings = tokenizer(ids.tolist()) if not hasattr(tokenizer, "decode") else token_strings(tokenizer, ids.tolist())
    where = torch.searchsorted(ids, tokens.cpu())
    return {name: member[where] for name, member in token_classes(list(strings)).items()}


def sequence_labels(
    sources: Sequence[str], prose_sources: Sequence[str] = PROSE_SOURCES
) -> dict[str, Bool[Tensor, " n"]]:
    """Sequence-level tasks from each sequence's source: "prose" (source in
    `prose_sources`) and one "source=<name>" task per source present."""
    tasks = {"prose": torch.tensor([s in prose_sources for s in sources], dtype=torch.bool)}
    for name in sorted(set(sources)):
        tasks[f"source={name}"] = torch.tensor([s == name for s in sources], dtype=torch.bool)
    return tasks


def token_sequences(
    records: Iterable[Mapping[str, Any]],
    encode: Callable[[str], list[int]],
    seq_len: int,
    per_source: int,
    bos: int | None = None,
) -> tuple[Int[Tensor, "n seq_len"], list[str]]:
    """Token sequences and their sources from records `{"text": ..., "source": ...}`:
    each text is encoded with `encode` and cut into non-overlapping sequences of
    `seq_len` tokens (with `bos`, each starts with it and holds seq_len - 1 text
    tokens; a shorter tail is dropped); the first `per_source` sequences of each
    source, in record order, are kept."""
    body = seq_len - (bos is not None)
    if body < 1:
        raise ProbeError(f"seq_len {seq_len} leaves no room for text tokens")
    rows, sources, counts = [], [], {}
    for record in records:
        source = record["source"]
        if counts.get(source, 0) >= per_source:
            continue
        ids = list(encode(record["text"]))
        for start in range(0, len(ids) - body + 1, body):
            if counts.get(source, 0) >= per_source:
                break
            rows.append(([] if bos is None else [bos]) + ids[start : start + body])
            sources.append(source)
            counts[source] = counts.get(source, 0) + 1
    if not rows:
        raise ProbeError(f"no record is long enough for one sequence of {seq_len} tokens")
    return torch.tensor(rows, dtype=torch.long), sources


# --- features from a model --------------------------------------------------------

FeatureSource = Transcoder | str
"""A dictionary (its latents, encoded from its input site) or a hook site name (the
activation there, e.g. `blocks.3.mlp.hook_post` for the MLP neurons)."""


def collect_features(
    model: nn.Module,
    tokens: TokenInput,
    feature_sets: Mapping[str, FeatureSource],
    positions: Int[Tensor, "m 2"] | None = None,
    batch_size: int = 16,
    skip_bos: bool = True,
) -> dict[str, tuple[Float[Tensor, "n _d"], Float[Tensor, "m _d"]]]:
    """For each feature set: the features mean-pooled over each sequence (leaving out
    position 0 with `skip_bos`) and the features at `positions` (rows of `(sequence,
    position)`, sequences numbered over the whole token set; none if not given), on the
    CPU in float32. `tokens` is a `[n, pos]` tensor or any iterable of batches (see
    `hooks.tokens`), read once; every site needed is captured in one forward pass per
    batch of at most `batch_size` sequences."""
    for source in feature_sets.values():
        if isinstance(source, Transcoder):  # one at a time: an SAE and a transcoder may share an output site
            check_compatible(model, [source])
    for name, source in feature_sets.items():
        if isinstance(source, str):
            check_site_exists(model, source)
        elif not isinstance(source, Transcoder):
            raise AnalysisError(
                f"feature set {name!r}: expected a Transcoder or a hook site name, got {type(source).__name__}"
            )
    positions = torch.zeros(0, 2, dtype=torch.long, device="cpu") if positions is None else positions.cpu().long()
    if len(positions) and (positions < 0).any():
        raise ProbeError("positions must be (sequence, position) pairs inside tokens (non-negative indices)")
    sites = list(dict.fromkeys(f if isinstance(f, str) else f.cfg.input_site for f in feature_sets.values()))
    pooled: dict[str, list[Tensor]] = {name: [] for name in feature_sets}
    picked: dict[str, list[Tensor]] = {name: [] for name in feature_sets}
    order: list[Tensor] = []
    first = 0
    with torch.no_grad():
        for batch in token_batches_of(model, tokens, batch_size, min_positions=1 + int(skip_bos)):
            n, pos = batch.shape
            if len(positions) and (positions[:, 1] >= pos).any():
                raise ProbeError(f"positions must be (sequence, position) pairs inside tokens of {pos} positions")
            acts = capture(model, batch, sites)
            for site, x in acts.items():
                check_finite_activations(x, site)
            here = ((positions[:, 0] >= first) & (positions[:, 0] < first + n)).nonzero()[:, 0]
            flat = (positions[here, 0] - first) * pos + positions[here, 1]
            order.append(here)
            for name, source in feature_sets.items():
                x = (
                    acts[source]
                    if isinstance(source, str)
                    else source.encode(acts[source.cfg.input_site].to(source.W_enc.dtype))
                )
                x = x.float()
                pooled[name].append(x.reshape(n, pos, -1)[:, int(skip_bos) :].mean(1).cpu())
                picked[name].append(x[flat.to(x.device)].cpu())
            first += n
    if len(positions) and (positions[:, 0] >= first).any():
        raise ProbeError(f"positions must be (sequence, position) pairs inside tokens of {first} sequences")
    inverse = torch.argsort(torch.cat(order))
    return {name: (torch.cat(pooled[name]), torch.cat(picked[name])[inverse]) for name in feature_sets}


def _token_task_positions(
    labels: Bool[Tensor, "n pos"], per_class: int, skip_bos: bool, generator: torch.Generator
) -> tuple[Tensor, Tensor] | str:
    """Balanced positions for a token task: min(per_class, #positives, #negatives)
    positives and as many negatives, drawn at random; or why the task is skipped."""
    allowed = torch.ones_like(labels)
    allowed[:, : int(skip_bos)] = False
    pos_idx = (labels & allowed).nonzero()
    neg_idx = (~labels & allowed).nonzero()
    m = min(per_class, len(pos_idx), len(neg_idx))
    if m < 2:
        return f"too few tokens in a class ({len(pos_idx)} positive, {len(neg_idx)} negative)"
    pos_idx = pos_idx[torch.randperm(len(pos_idx), generator=generator)[:m]]
    neg_idx = neg_idx[torch.randperm(len(neg_idx), generator=generator)[:m]]
    return torch.cat([pos_idx, neg_idx]), torch.arange(2 * m) < m


def probe_dictionaries(
    model: nn.Module,
    tokens: TokenInput,
    feature_sets: Mapping[str, FeatureSource],
    sequence_tasks: Mapping[str, Bool[Tensor, " n_seq"]] | None = None,
    token_tasks: Mapping[str, Bool[Tensor, "n_tok pos_tok"]] | None = None,
    ks: Sequence[int] = (1, 2, 5),
    tokens_per_class: int = 500,
    test_fraction: float = 0.2,
    seed: int = 0,
    selection: Selection = "mean_diff",
    batch_size: int = 16,
    skip_bos: bool = True,
    n_splits: int = 1,
) -> dict[str, Any]:
    """Sparse probing of several feature sets on several tasks.

    Sequence tasks label each row of `tokens` (features mean-pooled over the row); token
    tasks label each token (`[n, pos]`; per task, a balanced sample of up to
    `tokens_per_class` tokens of each class). Every task is scored on `n_splits`
    stratified splits (`split_mask` with seeds `seed`, `seed + 1`, ...), the same for
    all feature sets and all k, and its score is the mean balanced accuracy over them:
    more splits, less noise on small tasks. A task with fewer than 2 samples in a class
    is skipped, with the reason.

    Returns `{"metric": "balanced_accuracy", "ks", "feature_sets", "n_splits", "tasks":
    {task: {"kind", "n", "n_positive", "n_test", "scores": {set: {k: balanced accuracy}},
    "features": {set: {k: feature indices chosen on the first split}}}}, "mean": {set:
    {k: mean over scored tasks}}}` (k as strings), ready for `json.dump`."""
    sequence_tasks, token_tasks = dict(sequence_tasks or {}), dict(token_tasks or {})
    if not sequence_tasks and not token_tasks:
        raise ProbeError("give at least one sequence task or token task")
    check_at_least(ProbeError, 1, n_splits=n_splits)
    for name, labels in sequence_tasks.items():
        if labels.shape != tokens.shape[:1]:
            raise ProbeError(f"sequence task {name!r}: {tuple(labels.shape)} labels for {len(tokens)} sequences")
    for name, labels in token_tasks.items():
        if labels.shape != tokens.shape:
            raise ProbeError(
                f"token task {name!r}: labels {tuple(labels.shape)} must match tokens {tuple(tokens.shape)}"
            )
    generator = torch.Generator().manual_seed(seed)
    chosen: dict[str, tuple[Tensor, Tensor] | str] = {
        name: _token_task_positions(labels.cpu().bool(), tokens_per_class, skip_bos, generator)
        for name, labels in token_tasks.items()
    }
    sampled = [c[0] for c in chosen.values() if not isinstance(c, str)]
    union, inverse = torch.cat(sampled).unique(dim=0, return_inverse=True) if sampled else (None, None)
    collected = collect_features(model, tokens, feature_sets, union, batch_size, skip_bos)
    jobs: dict[str, tuple[str, Tensor | None, Tensor] | tuple[str, str]] = {}
    for name, labels in sequence_tasks.items():
        labels = labels.cpu().bool()
        small = min(int(labels.sum()), int((~labels).sum()))
        too_few = f"too few sequences in a class ({small})"
        jobs[name] = ("sequence", too_few) if small < 2 else ("sequence", None, labels)
    offset = 0
    for name, choice in chosen.items():
        if isinstance(choice, str):
            jobs[name] = ("token", choice)
        else:
            jobs[name] = ("token", inverse[offset : offset + len(choice[0])], choice[1])
            offset += len(choice[0])
    table: dict[str, Any] = {
        "metric": "balanced_accuracy",
        "ks": list(ks),
        "feature_sets": list(feature_sets),
        "n_splits": n_splits,
        "tasks": {},
    }
    for name, job in jobs.items():
        if len(job) == 2:
            table["tasks"][name] = {"kind": job[0], "skipped": job[1]}
            continue
        kind, rows, labels = job
        tests = [split_mask(labels, test_fraction, seed + i) for i in range(n_splits)]
        entry = {
            "kind": kind,
            "n": len(labels),
            "n_positive": int(labels.sum()),
            "n_test": int(tests[0].sum()),
            "scores": {},
            "features": {},
        }
        for set_name in feature_sets:
            pooled, at_positions = collected[set_name]
            x = pooled if rows is None else at_positions[rows]
            results = {
                k: [sparse_probe(x, labels, min(k, x.shape[1]), test, selection=selection) for test in tests]
                for k in ks
            }
            entry["scores"][set_name] = {
                str(k): sum(r.balanced_accuracy for r in rs) / n_splits for k, rs in results.items()
            }
            entry["features"][set_name] = {str(k): rs[0].features for k, rs in results.items()}
        table["tasks"][name] = entry
    scored = [t for t in table["tasks"].values() if "scores" in t]
    table["mean"] = {
        s: {str(k): sum(t["scores"][s][str(k)] for t in scored) / len(scored) if scored else float("nan") for k in ks}
        for s in feature_sets
    }
    return table
