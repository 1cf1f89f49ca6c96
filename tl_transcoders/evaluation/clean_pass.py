"""The clean forward pass of one batch, and the variants run from its cached state.

A variant changes one site (a transcoder's output, or an ablation) or splices several
transcoders. Where the site is a block's own `hook_mlp_out` and the model can be resumed
mid-way (`sites.resumable_pass`), the stream after the block is `resid_post + (new -
old)` and only the later blocks and the unembedding run; otherwise the variant is a full
forward pass with a hook. The all-spliced variant starts at the first spliced block.

KL(clean || variant) = sum_v p_v (z_v - z'_v) + lse(z') - lse(z), computed from the
clean probabilities and sum_v p_v z_v (the clean logits are not kept). Its first term is
linear in the unembedding's input h' of the variant, since the unembedding is affine:
sum_v p_v (z_v - z'_v) = -(h' - h) . u with u = d(sum_v p_v z_v)/dh, an O(d_model)
product in place of an O(d_vocab) one. It is checked against the direct sum once per
batch and dropped if they disagree (or if the head is not affine: a logit soft-cap).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_transcoders.core.config import default_output_site, layer_of
from tl_transcoders.core.errors import TranscodersError
from tl_transcoders.core.placement import AnyTranscoder
from tl_transcoders.hooks.sites import attach, check_resume, resumable_pass, store_hook
from tl_transcoders.hooks.splice import placements_of, transcoder_hooks

__all__ = ["CleanPass", "EvaluationError", "NonFiniteLogitsError", "head_input"]


class EvaluationError(TranscodersError, ValueError):
    """An evaluation that cannot give a meaningful number (bad transcoders, NaN outputs)."""


class NonFiniteLogitsError(EvaluationError, FloatingPointError):
    """The model itself produced NaN or inf logits on the evaluation tokens."""


@contextlib.contextmanager
def head_input(model: nn.Module) -> Iterator[dict[str, Tensor]]:
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


class CleanPass:
    """The clean pass of `batch`, caching the activations at `sites` and the residual
    stream each variant resumes from.

    Args:
        model: the hooked model.
        batch: `[batch, pos]` token ids.
        sites: every input and output site the variants read or replace.
        transcoders: the transcoders the all-spliced variant splices (may be empty).
        resumable: False to run every variant as a full forward pass.
        verify: check that resuming reproduces the clean logits, and set `resumable`
            to False (with a warning) where it does not.
        logits: compute the clean logits, log-normaliser and CE (False for a pass that
            only caches what the mean-ablation variants start from; it then stops after
            the last block it needs where the backend allows)."""

    def __init__(
        self,
        model: nn.Module,
        batch: Int[Tensor, "batch pos"],
        sites: Sequence[str],
        transcoders: Sequence[AnyTranscoder],
        resumable: bool,
        verify: bool = False,
        logits: bool = True,
    ):
        self.model, self.batch, self.resumable = model, batch, resumable
        self.transcoders = list(transcoders)
        sites = sorted(set(sites))
        resid_layers = {layer_of(s) for s in sites if self._is_delta_site(s)}
        first = self._first_spliced_layer()
        if first:
            resid_layers.add(first - 1)
        self.cache: dict[str, Tensor] = {}
        resid_sites = [f"blocks.{layer}.hook_resid_post" for layer in sorted(resid_layers)]
        hooks = [(site, store_hook(self.cache, site)) for site in sites + resid_sites]
        with resumable_pass(model) as self.resume, attach(model, hooks), head_input(model) as head:
            if logits:
                clean = model(batch, return_type="logits")
            else:
                model(batch, return_type=None, **self._stop(sites + resid_sites))
        self.resid = {layer: self.cache[f"blocks.{layer}.hook_resid_post"] for layer in resid_layers}
        self.head_input = head.get("x")
        if not logits:
            return
        if not torch.isfinite(clean).all():
            raise NonFiniteLogitsError(
                "the model itself produced NaN or inf logits on these tokens; check its "
                "weights and dtype (fp16 overflows easily) before evaluating transcoders"
            )
        if verify and self.resid:
            self.resumable = self._resume_matches(clean)
        # The clean logits are not kept: KL needs only the probabilities and sum_v p_v z_v.
        clean = clean.float()
        self.lse = torch.logsumexp(clean, dim=-1)
        self.ce = self.ce_of(clean, self.lse)
        self.probs = (clean - self.lse[..., None]).exp_()
        self.expected_logit = torch.linalg.vecdot(self.probs, clean)
        del clean
        self.kl_direction = self._kl_direction() if self.transcoders else None
        self.kl_direction_checked = False

    def _stop(self, sites: list[str]) -> dict:
        """`stop_at_layer` after the last block holding one of `sites`, where the model
        can still be resumed after stopping (HookedTransformer); {} otherwise."""
        layers = [layer_of(site) for site in sites]
        if None in layers or not layers or not self.resumable or self.resume.needs_whole_pass:
            return {}
        return {"stop_at_layer": max(layers) + 1}

    def _is_delta_site(self, site: str) -> bool:
        """True where a new value at `site` can be added to the cached residual stream:
        the block's own `hook_mlp_out`, on a backend that can start mid-model."""
        layer = layer_of(site)
        return self.resumable and layer is not None and site == default_output_site(layer)

    def _first_spliced_layer(self) -> int | None:
        """The block the all-spliced variant can start at, or None for a full pass."""
        sites = [s for p in placements_of(self.transcoders) for s in (p.input_site, p.output_site)]
        layers = [layer_of(s) for s in sites]
        if not sites or not self.resumable or None in layers:
            return None
        return min(layers)

    def _resume_matches(self, logits: Tensor) -> bool:
        """Resume from the latest cached block that leaves at least one block to run and
        compare with the clean logits."""
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

    def _kl_direction(self) -> Tensor | None:
        """`u` of the module docstring, or None where the head is not affine."""
        if self.head_input is None or (getattr(self.model.cfg, "output_logits_soft_cap", 0) or 0) > 0:
            return None
        with torch.enable_grad():
            h = self.head_input.detach().requires_grad_(True)
            logits = self.model.unembed(h).float()
            (u,) = torch.autograd.grad(torch.linalg.vecdot(logits, self.probs).sum(), h)
        return u.double()

    def variant_logits(self, site: str, value: Tensor) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits with the activation at `site` replaced by `value`, all else clean."""
        if self._is_delta_site(site):
            layer = layer_of(site)
            residual = self.resid[layer] + (value - self.cache[site])
            return self.resume(residual, layer + 1)
        with attach(self.model, [(site, lambda _: value)]):
            return self.model(self.batch, return_type="logits")

    def all_spliced_logits(self) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits with every transcoder spliced in, starting at the first spliced block."""
        first = self._first_spliced_layer()
        with attach(self.model, transcoder_hooks(self.transcoders)):
            if first:
                return self.resume(self.resid[first - 1], first)
            return self.model(self.batch, return_type="logits")

    def ce_of(self, logits: Tensor, lse: Tensor | None = None) -> Float[Tensor, "batch pos_1"]:
        """Next-token CE `[batch, pos-1]` of `logits`: logsumexp minus the target logit,
        without materialising log-probabilities over the vocabulary."""
        lse = torch.logsumexp(logits.float(), dim=-1) if lse is None else lse
        target = logits[:, :-1].gather(-1, self.batch[:, 1:, None])[..., 0].float()
        return lse[:, :-1] - target

    def ce_and_kl_of(self, logits: Tensor, head_input: Tensor | None) -> tuple[Tensor, Tensor]:
        """CE `[batch, pos-1]` of a variant's `logits` and KL(clean || variant) `[batch,
        pos]`, through the shortcut of the module docstring when the variant's
        unembedding input `head_input` is known."""
        logits = logits.float()
        lse = torch.logsumexp(logits, dim=-1)
        direct = None
        if self.kl_direction is None or head_input is None or not self.kl_direction_checked:
            direct = self.expected_logit - torch.linalg.vecdot(self.probs, logits)
        if self.kl_direction is not None and head_input is not None:
            shortcut = -torch.linalg.vecdot(head_input.double() - self.head_input.double(), self.kl_direction)
            if direct is not None:
                self.kl_direction_checked = True
                if not torch.allclose(shortcut.float(), direct, atol=1e-4, rtol=1e-3):
                    self.kl_direction = None
            if self.kl_direction is not None:
                direct = shortcut.float()
        kl = direct + lse - self.lse
        return self.ce_of(logits, lse), kl.clamp_min(0.0)
