"""`evaluate_splice`: what splicing transcoders in does to the model's loss.

For a set of transcoders and a token set the report gives the clean CE, the CE and KL
with all transcoders spliced at once, and for each layer: CE with that transcoder alone,
with the MLP output zero- and mean-ablated, CE recovered, KL, FVU, L0 and the fraction
of dead latents.

Cost. One clean forward pass per batch caches, for every layer, the residual stream
after the block and the MLP's input and output. Every single-layer variant then changes
only that layer's MLP output, so the stream after the block is `resid_post + (new -
old)` and only the later blocks and the unembedding run (`start_at_layer`). Where the
backend cannot start mid-model (the TL 3.x Bridge) or the output site is not the
block's `hook_mlp_out`, the variant runs as a full forward pass with a hook instead.
The ablation baselines do not depend on the transcoders: `compute_ablation_baselines`
computes them once for a token set and `evaluate_splice(..., baselines=...)` reuses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from tl_transcoders.core.config import default_output_site
from tl_transcoders.hooks.sites import (
    attach,
    check_resume,
    is_bridge,
    layer_of,
    model_device,
    resumable_pass,
)
from tl_transcoders.hooks.splice import check_compatible, describe, transcoder_hooks
from tl_transcoders.core.transcoder import Transcoder

Tokens = Int[Tensor, "batch pos"]
TokenBatches = list[Int[Tensor, "_ pos"]]
"""Token batches of one sequence length; the last batch may be smaller."""
TokenInput = Tensor | Iterable[Tensor]
"""A `[batch, pos]` tensor of token ids or an iterable of them. Left unshaped in
signatures on purpose: `check_token_batches` checks it and says what is wrong (rank, dtype,
vocabulary range, context length) in the caller's terms."""


@dataclass
class LayerReport:
    """Splice-in numbers for one layer's transcoder (CE in nats per token)."""

    ce_spliced: float
    ce_zero_ablated: float
    ce_mean_ablated: float
    ce_recovered: float
    kl: float
    fvu: float
    l0: float
    dead_fraction: float

    def to_dict(self) -> dict[str, float]:
        return dict(vars(self))


@dataclass
class SpliceReport:
    """The result of `evaluate_splice`.

    `per_token` holds next-token CE `[batch, pos-1]` for "clean", "all_spliced" and
    "layer{L}.spliced|zero_ablated|mean_ablated"; `kl_per_token` holds KL(clean ||
    spliced) `[batch, pos]` for "all_spliced" and "layer{L}.spliced"."""

    ce_clean: float
    ce_all_spliced: float
    kl_all_spliced: float
    n_tokens: int
    layers: dict[int, LayerReport]
    per_token: dict[str, Tensor] = field(repr=False)
    kl_per_token: dict[str, Tensor] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Scalars only, JSON-ready (layer keys become strings)."""
        return {
            "ce_clean": self.ce_clean,
            "ce_all_spliced": self.ce_all_spliced,
            "kl_all_spliced": self.kl_all_spliced,
            "n_tokens": self.n_tokens,
            "layers": {str(layer): r.to_dict() for layer, r in sorted(self.layers.items())},
        }


@dataclass
class AblationBaselines:
    """Zero- and mean-ablation CE for a set of output sites on one token set.

    `per_token[site]` holds `(zero_ablated, mean_ablated)` CE `[batch, pos-1]`; `means`
    the mean activation of each site over the token set. `fingerprint` identifies the
    token set, so the baselines are never reused with other tokens."""

    fingerprint: str
    ce_clean: float
    per_token_clean: Tensor = field(repr=False)
    per_token: dict[str, tuple[Tensor, Tensor]] = field(repr=False)
    means: dict[str, Tensor] = field(repr=False)

    def ce(self, site: str) -> tuple[float, float]:
        """Mean (zero-ablated, mean-ablated) CE for `site`."""
        zero, mean = self.per_token[site]
        return zero.mean().item(), mean.mean().item()


def evaluate_splice(
    model: nn.Module,
    transcoders: Sequence[Transcoder],
    tokens: TokenInput,
    baselines: AblationBaselines | None = None,
) -> SpliceReport:
    """Measure the spliced model on `tokens` (one `[batch, pos]` tensor or an iterable of
    them, all with the same `pos`). CE follows TransformerLens's `return_type="loss"`:
    the mean next-token loss over all predicted positions. KL is KL(clean || spliced) of
    the next-token distributions, averaged over all positions. FVU, L0 and dead
    fraction are measured on the transcoder's input and output sites in the clean run.

    Pass `baselines` (from `compute_ablation_baselines` on the same tokens) to skip the
    zero- and mean-ablation passes."""
    transcoders = list(transcoders)
    if not transcoders:
        raise ValueError("evaluate_splice needs at least one transcoder")
    layers = [t.cfg.layer for t in transcoders]
    if len(set(layers)) != len(layers):
        raise ValueError(f"evaluate_splice takes at most one transcoder per layer, got layers {layers}")
    check_compatible(model, transcoders)
    batches = check_token_batches(model, tokens)
    if baselines is None:
        sites = [t.cfg.output_site for t in transcoders]
        run, baselines = _run(model, batches, transcoders, sites)
    else:
        _check_baselines(baselines, batches, transcoders)
        run, _ = _run(model, batches, transcoders, [])
    return _report(run, transcoders, baselines)


def compute_ablation_baselines(
    model: nn.Module, tokens: TokenInput, sites: Sequence[str | int]
) -> AblationBaselines:
    """Zero- and mean-ablation CE for each output site (a hook name, or a layer number
    for that layer's `hook_mlp_out`) on `tokens`, to reuse across `evaluate_splice`
    calls on the same tokens (e.g. every checkpoint of a training run)."""
    sites = [default_output_site(s) if isinstance(s, int) else s for s in sites]
    return _run(model, check_token_batches(model, tokens), [], sites)[1]


# --- the evaluation run -------------------------------------------------------------


@dataclass
class _RunResult:
    """Per-token losses and transcoder statistics accumulated over batches."""

    per_token: dict[str, list[Tensor]]
    kl_per_token: dict[str, list[Tensor]]
    fvu: dict[int, float]
    l0: dict[int, float]
    dead_fraction: dict[int, float]


def _run(
    model: nn.Module,
    batches: TokenBatches,
    transcoders: list[Transcoder],
    ablation_sites: list[str],
) -> tuple[_RunResult, AblationBaselines]:
    """One clean pass per batch, then every variant from the cached clean state.

    Mean ablation needs the mean over all batches, so it runs after the first sweep;
    the last batch's clean state is still cached then, earlier batches are re-run."""
    delta_ok = True
    per_token: dict[str, list[Tensor]] = {}
    kl_per_token: dict[str, list[Tensor]] = {}
    stats = {t.cfg.layer: _TranscoderStats(t.cfg.d_latent, t.cfg.d_out) for t in transcoders}
    site_sums: dict[str, Tensor] = {}
    n_positions = 0

    def record(name: str, ce: Tensor, kl: Tensor | None = None) -> None:
        per_token.setdefault(name, []).append(ce)
        if kl is not None:
            kl_per_token.setdefault(name, []).append(kl)

    clean = None
    with torch.no_grad():
        for index, batch in enumerate(batches):
            verify = index == 0 and is_bridge(model)
            clean = _CleanRun(model, batch, transcoders, ablation_sites, delta_ok, verify)
            delta_ok = clean.delta_ok
            record("clean", clean.ce)
            n_positions += batch.numel()
            for site in ablation_sites:
                total = clean.outputs[site].double().sum(dim=(0, 1))
                site_sums[site] = site_sums.get(site, 0) + total
                zeros = torch.zeros_like(clean.outputs[site])
                record(f"{site}.zero_ablated", clean.ce_of(clean.variant_logits(site, zeros)))
            if transcoders:
                with _head_input(model) as head:
                    logits = clean.all_spliced_logits(transcoders)
                record("all_spliced", *clean.ce_and_kl_of(logits, head.get("x")))
            for transcoder in transcoders:
                c = transcoder.cfg
                target = clean.outputs[c.output_site]
                x = clean.inputs[c.input_site].to(transcoder.W_enc.dtype)
                out, latents = transcoder.forward_with_latents(x)
                if not torch.isfinite(out).all():
                    raise ValueError(
                        f"{describe(transcoder)} produced NaN or inf outputs on the clean "
                        "activations; check its weights and dtype"
                    )
                out = out.to(target.dtype)
                stats[c.layer].update(out, target, latents)
                with _head_input(model) as head:
                    logits = clean.variant_logits(c.output_site, out)
                record(f"layer{c.layer}.spliced", *clean.ce_and_kl_of(logits, head.get("x")))

        means = {
            site: (total / n_positions).to(clean.outputs[site].dtype)
            for site, total in site_sums.items()
        }
        for i, batch in enumerate(batches if ablation_sites else []):
            last = i == len(batches) - 1
            state = clean if last else _CleanRun(model, batch, [], ablation_sites, delta_ok, False)
            for site in ablation_sites:
                ablated = means[site].expand_as(state.outputs[site])
                record(f"{site}.mean_ablated", state.ce_of(state.variant_logits(site, ablated)))

    result = _RunResult(
        per_token=per_token,
        kl_per_token=kl_per_token,
        fvu={layer: s.fvu() for layer, s in stats.items()},
        l0={layer: s.l0() for layer, s in stats.items()},
        dead_fraction={layer: s.dead_fraction() for layer, s in stats.items()},
    )
    clean_ce = torch.cat(per_token["clean"])
    baselines = AblationBaselines(
        fingerprint=_fingerprint(batches),
        ce_clean=clean_ce.mean().item(),
        per_token_clean=clean_ce,
        per_token={
            site: (
                torch.cat(per_token[f"{site}.zero_ablated"]),
                torch.cat(per_token[f"{site}.mean_ablated"]),
            )
            for site in ablation_sites
        },
        means=means,
    )
    return result, baselines


class _CleanRun:
    """The clean forward pass of one batch, and the variants run from its cached state.

    Caches the clean log-probs, each transcoder's input and output site, and the
    residual stream after every block a variant or the all-spliced run starts from.
    With `verify`, checks once that resuming mid-model reproduces the clean logits and
    falls back to full forward passes (with a warning) where it does not."""

    def __init__(
        self,
        model: nn.Module,
        batch: Tokens,
        transcoders: list[Transcoder],
        output_sites: list[str],
        delta_ok: bool,
        verify: bool,
    ):
        self.model, self.batch, self.delta_ok = model, batch, delta_ok
        out_sites = set(output_sites) | {t.cfg.output_site for t in transcoders}
        in_sites = {t.cfg.input_site for t in transcoders}
        resid_layers = {layer_of(s) for s in out_sites if self._is_delta_site(s)}
        first = self._first_spliced_layer(transcoders)
        if first:
            resid_layers.add(first - 1)
        cache: dict[str, Tensor] = {}

        def store(site: str):
            def hook(activation: Tensor) -> None:
                cache[site] = activation

            return hook

        resid_sites = [f"blocks.{layer}.hook_resid_post" for layer in sorted(resid_layers)]
        hooks = [(site, store(site)) for site in sorted(in_sites | out_sites) + resid_sites]
        with resumable_pass(model) as self.resume, attach(model, hooks), _head_input(model) as head:
            logits = model(batch, return_type="logits")
        if not torch.isfinite(logits).all():
            raise ValueError(
                "the model itself produced NaN or inf logits on these tokens; check its "
                "weights and dtype (fp16 overflows easily) before evaluating transcoders"
            )
        self.resid = {layer: cache[f"blocks.{layer}.hook_resid_post"] for layer in resid_layers}
        if verify and self.resid:
            self.delta_ok = self._resume_matches(logits)
        self.logits = logits.float()
        self.lse = torch.logsumexp(self.logits, dim=-1)
        self.probs = torch.exp(self.logits - self.lse[..., None])
        self.ce = self.ce_of(self.logits, self.lse)
        self.inputs = {site: cache[site] for site in in_sites}
        self.outputs = {site: cache[site] for site in out_sites}
        self.head_input = head.get("x")
        self.kl_direction = self._kl_direction() if transcoders else None
        self.kl_direction_checked = False

    def _kl_direction(self) -> Tensor | None:
        """`u = d(sum_v p_v z_v) / dh` at the unembedding's input `h`, for clean probs `p`
        and logits `z`. The unembedding is affine, so for a variant's input `h'` and
        logits `z'`: sum_v p_v (z_v - z'_v) = -(h' - h) . u, an O(d_model) product in
        place of an O(d_vocab) one. None where the head is not affine (logit soft-cap)."""
        if self.head_input is None or (getattr(self.model.cfg, "output_logits_soft_cap", 0) or 0) > 0:
            return None
        with torch.enable_grad():
            h = self.head_input.detach().requires_grad_(True)
            logits = self.model.unembed(h).float()
            (u,) = torch.autograd.grad(torch.linalg.vecdot(logits, self.probs).sum(), h)
        return u.double()

    def _resume_matches(self, logits: Tensor) -> bool:
        """Resume from the latest cached block that leaves at least one block to run
        and compare with the clean logits."""
        n_layers = self.model.cfg.n_layers
        layer = max(self.resid, key=lambda L: (L + 1 < n_layers, L))
        if check_resume(self.resume, self.resid[layer], layer + 1, logits):
            return True
        warnings.warn(
            f"resuming {type(self.model).__name__} mid-model did not reproduce its logits; "
            "evaluating every variant with a full forward pass instead (slower, same numbers)",
            stacklevel=4,
        )
        return False

    def _is_delta_site(self, site: str) -> bool:
        """True where a new value at `site` can be added to the cached residual stream:
        the block's own `hook_mlp_out`, on a backend that can start mid-model."""
        layer = layer_of(site)
        return self.delta_ok and layer is not None and site == default_output_site(layer)

    def _first_spliced_layer(self, transcoders: list[Transcoder]) -> int | None:
        """The block the all-spliced run can start at, or None for a full pass."""
        layers = [layer_of(s) for t in transcoders for s in (t.cfg.input_site, t.cfg.output_site)]
        if not transcoders or not self.delta_ok or None in layers:
            return None
        return min(layers)

    def variant_logits(self, site: str, value: Tensor) -> Tensor:
        """Logits with the activation at `site` replaced by `value`, all else clean."""
        if self._is_delta_site(site):
            layer = layer_of(site)
            residual = self.resid[layer] + (value - self.outputs[site])
            return self.resume(residual, layer + 1)
        with attach(self.model, [(site, lambda _: value)]):
            return self.model(self.batch, return_type="logits")

    def all_spliced_logits(self, transcoders: list[Transcoder]) -> Tensor:
        """Logits with every transcoder spliced in, starting at the first spliced block."""
        first = self._first_spliced_layer(transcoders)
        with attach(self.model, transcoder_hooks(transcoders)):
            if first:
                return self.resume(self.resid[first - 1], first)
            return self.model(self.batch, return_type="logits")

    def ce_of(self, logits: Tensor, lse: Tensor | None = None) -> Tensor:
        """Next-token CE `[batch, pos-1]` of `logits`: logsumexp minus the target logit,
        without materialising log-probabilities over the vocabulary."""
        lse = torch.logsumexp(logits.float(), dim=-1) if lse is None else lse
        target = logits[:, :-1].gather(-1, self.batch[:, 1:, None])[..., 0].float()
        return lse[:, :-1] - target

    def ce_and_kl_of(self, logits: Tensor, head_input: Tensor | None) -> tuple[Tensor, Tensor]:
        """CE `[batch, pos-1]` of `logits` and KL(clean || them) `[batch, pos]` from
        KL = sum_v p_v (z_v - z'_v) + lse(z') - lse(z), the sum taken through
        `kl_direction` when the unembedding's input `head_input` is known. The first
        use also computes the sum directly and keeps the shortcut only if they agree."""
        logits = logits.float()
        lse = torch.logsumexp(logits, dim=-1)
        direct = None
        if self.kl_direction is None or head_input is None or not self.kl_direction_checked:
            direct = torch.linalg.vecdot(self.probs, self.logits - logits)
        if self.kl_direction is not None and head_input is not None:
            shortcut = -torch.linalg.vecdot((head_input.double() - self.head_input.double()), self.kl_direction)
            if direct is not None:
                self.kl_direction_checked = True
                if not torch.allclose(shortcut.float(), direct, atol=1e-4, rtol=1e-3):
                    self.kl_direction = None
            if self.kl_direction is not None:
                direct = shortcut.float()
        kl = direct + lse - self.lse
        return self.ce_of(logits, lse), kl.clamp_min(0.0)


@contextlib.contextmanager
def _head_input(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Capture the input of `model.unembed` (the final normalised residual) during the
    block; yields a dict that holds it under "x" afterwards (empty if no `unembed`)."""
    captured: dict[str, Tensor] = {}
    unembed = getattr(model, "unembed", None)
    if not isinstance(unembed, nn.Module):
        yield captured
        return
    handle = unembed.register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
    try:
        yield captured
    finally:
        handle.remove()


class _TranscoderStats:
    """Running FVU, L0 and fired-latent tracking of one transcoder over batches."""

    def __init__(self, d_latent: int, d_out: int):
        self.squared_error = 0.0
        self.sum = torch.zeros(d_out, dtype=torch.float64)
        self.sum_squares = 0.0
        self.n = 0
        self.active = 0
        self.fired = torch.zeros(d_latent, dtype=torch.bool)

    def update(self, output: Tensor, target: Tensor, latents) -> None:
        y = target.reshape(-1, target.shape[-1]).double()
        y_hat = output.reshape(-1, output.shape[-1]).double()
        self.squared_error += (y - y_hat).pow(2).sum().item()
        self.sum += y.sum(0).cpu()
        self.sum_squares += y.pow(2).sum().item()
        self.n += y.shape[0]
        active = latents.values != 0
        self.active += int(active.sum())
        self.fired[latents.indices[active].cpu()] = True

    def fvu(self) -> float:
        """Squared error over the total variance of the target around its mean."""
        variance = self.sum_squares - self.sum.pow(2).sum().item() / self.n
        return self.squared_error / variance if variance > 0 else float("nan")

    def l0(self) -> float:
        return self.active / self.n

    def dead_fraction(self) -> float:
        return 1.0 - self.fired.float().mean().item()


def check_token_batches(model: nn.Module, tokens: TokenInput) -> TokenBatches:
    """`tokens` (one `[batch, pos]` tensor of token ids or several of one length) as a
    list of batches on the model's device; a `ValueError` that says which batch is wrong
    for a wrong shape or dtype, fewer than 2 positions, more than `n_ctx`, or an id
    outside the vocabulary."""
    batches = [tokens] if isinstance(tokens, Tensor) else list(tokens)
    if not batches:
        raise ValueError("no token batches given")
    d_vocab, n_ctx = model.cfg.d_vocab, model.cfg.n_ctx
    for i, batch in enumerate(batches):
        where = f"token batch {i}"
        if not isinstance(batch, Tensor) or batch.ndim != 2:
            shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise ValueError(f"{where}: expected a [batch, pos] tensor of token ids, got {shape}")
        if batch.is_floating_point() or batch.is_complex() or batch.dtype == torch.bool:
            raise ValueError(f"{where}: token ids must be integers, got {batch.dtype}")
        if batch.shape[1] < 2:
            raise ValueError(f"{where}: need at least 2 positions to predict a next token")
        if batch.shape[1] != batches[0].shape[1]:
            raise ValueError(
                f"{where}: has {batch.shape[1]} positions but batch 0 has "
                f"{batches[0].shape[1]}; use one sequence length for a token set"
            )
        if batch.shape[1] > n_ctx:
            raise ValueError(f"{where}: {batch.shape[1]} positions exceed the model's n_ctx={n_ctx}")
        if batch.min() < 0 or batch.max() >= d_vocab:
            raise ValueError(f"{where}: token ids must lie in [0, {d_vocab}), the model's vocabulary")
    device = model_device(model)
    return [batch.to(device=device, dtype=torch.long) for batch in batches]


def _fingerprint(batches: TokenBatches) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(str(tuple(batch.shape)).encode())
        digest.update(batch.cpu().numpy().tobytes())
    return digest.hexdigest()


def _check_baselines(
    baselines: AblationBaselines, batches: TokenBatches, transcoders: list[Transcoder]
) -> None:
    if baselines.fingerprint != _fingerprint(batches):
        raise ValueError(
            "these ablation baselines were computed on other tokens; compute them with "
            "compute_ablation_baselines on the same token set you evaluate"
        )
    missing = [t.cfg.output_site for t in transcoders if t.cfg.output_site not in baselines.per_token]
    if missing:
        raise ValueError(f"the ablation baselines do not cover site(s) {missing}")


def _report(run: _RunResult, transcoders: list[Transcoder], baselines: AblationBaselines) -> SpliceReport:
    per_token = {name: torch.cat(values) for name, values in run.per_token.items()}
    kl_per_token = {name: torch.cat(values) for name, values in run.kl_per_token.items()}
    ce_clean = per_token["clean"].mean().item()
    layers = {}
    for transcoder in transcoders:
        layer, site = transcoder.cfg.layer, transcoder.cfg.output_site
        zero, mean = baselines.per_token[site]
        per_token[f"layer{layer}.zero_ablated"] = zero
        per_token[f"layer{layer}.mean_ablated"] = mean
        ce_spliced = per_token[f"layer{layer}.spliced"].mean().item()
        ce_zero, ce_mean = baselines.ce(site)
        gap = ce_zero - ce_clean
        layers[layer] = LayerReport(
            ce_spliced=ce_spliced,
            ce_zero_ablated=ce_zero,
            ce_mean_ablated=ce_mean,
            ce_recovered=(ce_zero - ce_spliced) / gap if gap != 0 else float("nan"),
            kl=kl_per_token[f"layer{layer}.spliced"].mean().item(),
            fvu=run.fvu[layer],
            l0=run.l0[layer],
            dead_fraction=run.dead_fraction[layer],
        )
    for name in [n for n in per_token if n.startswith("blocks.")]:
        del per_token[name]
    return SpliceReport(
        ce_clean=ce_clean,
        ce_all_spliced=per_token["all_spliced"].mean().item(),
        kl_all_spliced=kl_per_token["all_spliced"].mean().item(),
        n_tokens=per_token["clean"].numel(),
        layers=layers,
        per_token=per_token,
        kl_per_token=kl_per_token,
    )
