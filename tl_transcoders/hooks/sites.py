"""Hook sites on both TransformerLens model classes.

A *site* is a hook name whose activation a transcoder reads or writes, such as
`blocks.3.mlp.hook_in` or `blocks.3.hook_mlp_out`. This module is the only place that
knows how the two model classes differ:

- `TransformerBridge` (TL 3.x-4.x) has every site as a hook point, including
  `blocks.L.mlp.hook_in` (the exact MLP input) and `blocks.L.mlp.hook_out`.
- `HookedTransformer` (TL 2.16-3.x) has no `mlp.hook_in` / `mlp.hook_out` (and TL 2.x no
  `unembed.hook_in` / `unembed.hook_out`); here those names are served by temporary
  PyTorch hooks on `blocks[L].mlp` or `unembed` (the module's input and output), so the
  model is never modified.

`attach` runs functions at sites for the length of a `with` block and removes every
hook on exit, also after an exception. `probe_sites` runs a tiny forward pass to check
that sites exist, fire, and in which order, and reads their widths.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_transcoders.core.config import (
    ConfigError,
    CrossLayerConfig,
    TranscoderConfig,
    default_input_site,
    default_output_site,
    layer_of,
)
from tl_transcoders.core.errors import TranscodersError

__all__ = [
    "ModelError",
    "Resume",
    "cross_layer_config",
    "SiteError",
    "SiteFn",
    "SiteInfo",
    "attach",
    "bridge_class",
    "capture",
    "capture_groups",
    "check_model",
    "check_resume",
    "check_site_exists",
    "input_space_of",
    "is_bridge",
    "model_device",
    "model_name",
    "probe_sites",
    "resumable_pass",
    "site_exists",
    "store_hook",
    "transcoder_config",
]

SiteFn = Callable[[Tensor], "Tensor | None"]
"""Called with the activation at a site; a returned tensor replaces it."""

_MODULE_SITE = re.compile(r"^(blocks\.(\d+)\.mlp|unembed)\.hook_(in|out)$")


class SiteError(TranscodersError, ValueError):
    """A site does not exist, never fires, or does not fit a transcoder."""


class ModelError(TranscodersError, TypeError):
    """Something that is not a TransformerLens model was given where one is needed."""


def check_model(model: object) -> None:
    """Raise `ModelError` unless `model` is a TransformerLens `HookedTransformer` or
    `TransformerBridge` (a module with `cfg`, `blocks` and hook points)."""
    if not isinstance(model, nn.Module) or not all(hasattr(model, name) for name in ("cfg", "blocks", "hooks")):
        raise ModelError(
            f"expected a TransformerLens HookedTransformer or TransformerBridge, got {type(model).__name__}; "
            "load one with tl_transcoders.load_model(name_or_path)"
        )


def bridge_class() -> type | None:
    """`TransformerBridge`, or None on TransformerLens versions without it."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None
    return TransformerBridge


def is_bridge(model: nn.Module) -> bool:
    """True for a `TransformerBridge`, False for a `HookedTransformer`."""
    cls = bridge_class()
    return cls is not None and isinstance(model, cls)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def _hook_names(model: nn.Module) -> set[str]:
    """The model's hook point names. Read once per call that needs them: the Bridge
    rebuilds `hook_dict` on every access (milliseconds on a 30-layer model)."""
    return set(model.hook_dict)


def _module_site(model: nn.Module, site: str, names: set[str]) -> tuple[nn.Module, str] | None:
    """For `blocks.L.mlp.hook_in|out` or `unembed.hook_in|out` on a model without that
    hook point (`names`): the module and whether the site is its input or output. None
    otherwise."""
    match = _MODULE_SITE.match(site)
    if match is None or site in names:
        return None
    if match.group(2) is None:
        module = getattr(model, "unembed", None)
    else:
        layer = int(match.group(2))
        module = getattr(model.blocks[layer], "mlp", None) if layer < len(model.blocks) else None
    return (module, match.group(3)) if isinstance(module, nn.Module) else None


def site_exists(model: nn.Module, site: str, names: set[str] | None = None) -> bool:
    """True if `site` names a hook point or a module input/output served by a module hook
    (see `_module_site`) of `model` (`names`: the model's hook names, if already read)."""
    names = _hook_names(model) if names is None else names
    return site in names or _module_site(model, site, names) is not None


def check_site_exists(model: nn.Module, site: str, names: set[str] | None = None) -> None:
    """Raise `SiteError` with the closest existing names if `site` does not exist."""
    names = _hook_names(model) if names is None else names
    if site_exists(model, site, names):
        return
    close = difflib.get_close_matches(site, sorted(names), n=4, cutoff=0.6)
    hint = f" Did you mean one of {close}?" if close else ""
    raise SiteError(f"hook site {site!r} does not exist on this {type(model).__name__}.{hint}")


@contextlib.contextmanager
def attach(model: nn.Module, hooks: Sequence[tuple[str, SiteFn]]) -> Iterator[None]:
    """Run each `fn` on the activation at its site during every forward pass inside the
    block; a tensor returned by `fn` replaces the activation. All hooks are removed on
    exit, also after an exception. Hooks at one site run in the given order."""
    names = _hook_names(model)
    for site, _ in hooks:
        check_site_exists(model, site, names)
    hook_point_hooks = []
    handles = []
    try:
        for site, fn in hooks:
            module_site = _module_site(model, site, names)
            if module_site is None:
                hook_point_hooks.append((site, _hook_point_fn(fn)))
            elif module_site[1] == "in":
                handles.append(module_site[0].register_forward_pre_hook(_pre_hook_fn(fn)))
            else:
                handles.append(module_site[0].register_forward_hook(_post_hook_fn(fn)))
        with model.hooks(fwd_hooks=hook_point_hooks):
            yield
    finally:
        for handle in handles:
            handle.remove()


def _hook_point_fn(fn: SiteFn):
    def hook(activation: Tensor, hook) -> Tensor | None:
        return fn(activation)

    return hook


def _pre_hook_fn(fn: SiteFn):
    def hook(module: nn.Module, args: tuple):
        new = fn(args[0])
        return None if new is None else (new, *args[1:])

    return hook


def _post_hook_fn(fn: SiteFn):
    def hook(module: nn.Module, args: tuple, output: Tensor):
        return fn(output)

    return hook


def store_hook(
    store: dict[Any, Any],
    key: Any,
    transform: Callable[[Tensor], Any] | None = None,
    keep_first: bool = False,
) -> SiteFn:
    """A hook that keeps the activation it sees (or `transform(activation)`) as
    `store[key]`. Each firing replaces what was stored, or with `keep_first` only the
    first one is kept (for a site that fires more than once in a pass)."""

    def hook(activation: Tensor) -> None:
        if not (keep_first and key in store):
            store[key] = activation if transform is None else transform(activation)

    return hook


def capture(model: nn.Module, tokens: Tensor, sites: Sequence[str]) -> dict[str, Float[Tensor, "n_tokens width"]]:
    """The activations at `sites` on `tokens`, flattened to `[batch * pos, width]`, from
    one no-grad forward pass that stops after the last block any site is in."""
    sites = list(dict.fromkeys(sites))
    cache: dict[str, Tensor] = {}
    hooks = [(site, store_hook(cache, site, lambda a: a.reshape(-1, a.shape[-1]))) for site in sites]
    with torch.no_grad(), attach(model, hooks):
        model(tokens, stop_at_layer=_stop_layer(model, sites))
    return cache


def capture_groups(
    model: nn.Module,
    tokens: Tensor,
    groups: Sequence[Sequence[str]],
    consume: Callable[[int, dict[str, Tensor]], None],
) -> None:
    """One no-grad forward pass over `tokens` (stopped after the last block any site is
    in) that hands over activations as soon as they exist: `consume(i, acts)` runs, from
    inside the pass, when the last site of `groups[i]` fires, with `acts` holding that
    group's sites flattened to `[batch * pos, width]` (each site's first firing). A site
    is released once every group that reads it has been consumed, so memory holds the
    sites of the groups still open, not of the whole pass (for per-layer groups, one
    layer's). `consume` may compute with gradients (`torch.enable_grad()`); an exception
    it raises ends the pass."""
    cache: dict[str, Tensor] = {}
    open_groups = {i: set(group) for i, group in enumerate(groups)}
    sites = list(dict.fromkeys(site for group in groups for site in group))

    def arrived(site: str) -> Callable[[Tensor], None]:
        def hook(activation: Tensor) -> None:
            if site in cache or not any(site in wanted for wanted in open_groups.values()):
                return
            cache[site] = activation.reshape(-1, activation.shape[-1])
            for i in [i for i, wanted in open_groups.items() if wanted <= cache.keys()]:
                del open_groups[i]
                consume(i, {name: cache[name] for name in groups[i]})
            for name in [name for name in cache if not any(name in wanted for wanted in open_groups.values())]:
                cache[name] = None  # consumed: released, but remembered as seen

        return hook

    with torch.no_grad(), attach(model, [(site, arrived(site)) for site in sites]):
        model(tokens, stop_at_layer=_stop_layer(model, sites))


def _stop_layer(model: nn.Module, sites: Sequence[str]) -> int | None:
    """The `stop_at_layer` that runs every block holding one of `sites` and nothing
    after, or None (a full pass) for a site outside the blocks. HookedTransformer stops
    before the final norm and unembedding at `n_layers`; the Bridge runs them there."""
    layers = [layer_of(site) for site in sites]
    if None in layers:
        return None
    stop = max(layers) + 1
    if stop >= model.cfg.n_layers:
        return None if is_bridge(model) else model.cfg.n_layers
    return stop


@dataclass(frozen=True)
class SiteInfo:
    """What a probe pass saw at a site: when it first fired and its width."""

    order: int
    width: int


def probe_sites(model: nn.Module, sites: Sequence[str]) -> dict[str, SiteInfo]:
    """Run a 2-token forward pass (stopped after the last block needed) and report,
    for each site, the order in which it first fired and its last dimension.

    Raises `SiteError` for a site that does not exist or never fires (for example
    `hook_mlp_in` on a model where `use_hook_mlp_in` is off)."""
    sites = list(dict.fromkeys(sites))
    if not sites:
        return {}
    names = _hook_names(model)
    for site in sites:
        check_site_exists(model, site, names)
    widths: dict[str, int] = {}  # in the order the sites first fire
    hooks = [(site, store_hook(widths, site, lambda a: a.shape[-1], keep_first=True)) for site in sites]
    tokens = torch.zeros(1, 2, dtype=torch.long, device=model_device(model))
    try:
        with attach(model, hooks), torch.no_grad():
            model(tokens, stop_at_layer=_stop_layer(model, sites))
    except ValueError as err:  # the Bridge refuses hooks its config has switched off
        raise SiteError(str(err)) from err
    seen = {site: SiteInfo(order=order, width=w) for order, (site, w) in enumerate(widths.items())}
    silent = [site for site in sites if site not in seen]
    if silent:
        raise SiteError(
            f"hook site(s) {silent} exist but never fire in a forward pass of this model. "
            "For hook_mlp_in call model.set_use_hook_mlp_in(True); for other optional hooks "
            "see the model's set_use_* methods."
        )
    return seen


@dataclass(frozen=True)
class NormProbe:
    """A norm module of the model run on random rows `x` (float64 views of the results).

    `centres` is True for LayerNorm (the output does not change when a constant is added
    to a row), False for RMSNorm; `normalized` is the norm's own normalised vector,
    `centre(x) / scale` or `x / scale`; `seen` what its `hook_normalized` saw, which
    TransformerLens 3.x and later take before the affine step and TransformerLens 2.x
    LayerNorm after it; `output` the module's output."""

    x: Tensor
    normalized: Tensor
    seen: Tensor
    output: Tensor
    centres: bool

    @property
    def hook_before_affine(self) -> bool:
        """True where `hook_normalized` sees the normalised vector itself."""
        return torch.allclose(self.seen, self.normalized, rtol=1e-4, atol=1e-5)


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    module: nn.Module | None = model
    for part in name.split("."):
        module = getattr(module, part, None) if module is not None else None
    return module


def probe_norm(model: nn.Module, name: str) -> NormProbe | None:
    """Run the norm module `name` (e.g. `blocks.2.ln2`, `ln_final`) on random rows and
    read what it does (`NormProbe`); None when the model has no such module or it is an
    identity."""
    module = _submodule(model, name)
    if module is None or isinstance(module, nn.Identity):
        return None
    hooks = {part: getattr(module, f"hook_{part}", None) for part in ("normalized", "scale")}
    if None in hooks.values():
        raise SiteError(f"{name} of this {type(model).__name__} has no hook_normalized / hook_scale; not a norm")
    param = next(model.parameters())
    d_model = model.cfg.d_model
    generator = torch.Generator().manual_seed(0)
    x = 1.0 + torch.randn(2 * d_model + 2, d_model, generator=generator, dtype=torch.float64, device="cpu")
    seen: dict[str, Tensor] = {}
    handles = [
        hook.register_forward_hook(_post_hook_fn(store_hook(seen, part, lambda a: a.detach())))
        for part, hook in hooks.items()
    ]
    try:
        with torch.no_grad():
            shifted = module((x + 3.0)[None].to(device=param.device, dtype=param.dtype))[0].double()
            output = module(x[None].to(device=param.device, dtype=param.dtype))[0].double()
    finally:
        for handle in handles:
            handle.remove()
    centres = torch.allclose(output, shifted, rtol=1e-3, atol=1e-4)
    scale = seen["scale"][0].double().reshape(-1, 1)
    normalized = (x - x.mean(-1, keepdim=True) if centres else x).to(scale.device) / scale
    return NormProbe(x, normalized, seen["normalized"][0].double(), output, centres)


def input_space_of(model: nn.Module, site: str) -> str:
    """The input space a transcoder reading `site` of `model` is trained in.

    The MLP's own input (`mlp.hook_in`, and `ln2.hook_out` on the Bridge) depends on
    whether the layer-norm weights are folded; so does `ln2.hook_normalized` where it is
    taken after the norm's affine step (TransformerLens 2.x LayerNorm). Taken before it,
    and on the residual stream, every space reads the same values ("any")."""
    if site.endswith("ln2.hook_normalized"):
        probe = probe_norm(model, site.removesuffix(".hook_normalized"))
        if probe is None or probe.hook_before_affine:
            return "any"
    elif not site.endswith(("mlp.hook_in", "ln2.hook_out")):
        return "any"
    if is_bridge(model):
        folded = getattr(model, "compatibility_mode", False) and getattr(model, "_weights_processed", False)
        return "folded_ln" if folded else "unfolded_ln"
    norm = model.cfg.normalization_type
    if norm is None:
        return "no_ln"
    return "folded_ln" if norm in ("LNPre", "RMSPre") else "unfolded_ln"


def model_name(model: nn.Module) -> str | None:
    """The model's name as TransformerLens records it."""
    return getattr(model.cfg, "model_name", None)


def _check_size_and_layers(
    model: nn.Module, caller: str, d_latent: int | None, expansion: int | None, layers: Sequence[int]
) -> None:
    """The dictionary size is given once (`d_latent`, or `expansion` as a positive
    integer: `ConfigError`) and every layer is one of the model's (`SiteError`)."""
    if (d_latent is None) == (expansion is None):
        raise ConfigError(f"{caller}: give exactly one of d_latent= and expansion=")
    if expansion is not None and (isinstance(expansion, bool) or not isinstance(expansion, int) or expansion < 1):
        raise ConfigError(
            f"{caller}: expansion must be a positive integer (d_latent = expansion * d_in), got {expansion!r}"
        )
    n_layers = model.cfg.n_layers
    bad = [
        layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers
    ]
    if bad:
        raise SiteError(
            f"{caller}: layer {bad[0]!r} is out of range: the model has {n_layers} layers (0..{n_layers - 1})"
        )


def transcoder_config(
    model: nn.Module,
    layer: int,
    d_latent: int | None = None,
    input_site: str | None = None,
    output_site: str | None = None,
    *,
    expansion: int | None = None,
    **fields: Any,
) -> TranscoderConfig:
    """A `TranscoderConfig` for `layer` of `model`: `d_in` and `d_out` are read from the
    sites (by one tiny probe pass that also checks they exist and fire), `input_space`
    and `model_name` from the model. The dictionary has `d_latent` latents, or
    `expansion * d_in` when `d_latent` is None. Other fields (`activation`, `k`,
    `skip`, ...) are passed through."""
    _check_size_and_layers(model, "transcoder_config", d_latent, expansion, [layer])
    input_site = input_site or default_input_site(layer)
    output_site = output_site or default_output_site(layer)
    info = probe_sites(model, [input_site, output_site])
    d_in = info[input_site].width
    return TranscoderConfig(
        d_in=d_in,
        d_out=info[output_site].width,
        d_latent=d_latent if d_latent is not None else expansion * d_in,
        layer=layer,
        input_site=input_site,
        output_site=output_site,
        input_space=input_space_of(model, input_site),
        model_name=model_name(model),
        **fields,
    )


def cross_layer_config(
    model: nn.Module,
    layers: Sequence[int] | range | None = None,
    d_latent: int | None = None,
    *,
    expansion: int | None = None,
    **fields: Any,
) -> CrossLayerConfig:
    """A `CrossLayerConfig` over `layers` of `model` (consecutive; default all): `d_model`
    read from the sites (`input_hook` and `output_hook` in each block, by default the
    MLP's input and output; probed as `transcoder_config` does), `input_space` and
    `model_name` from the model. `d_latent` latents per layer, or `expansion * d_model`.
    Other fields (`activation`, `k`, `skip`, ...) are passed through."""
    layers = list(range(model.cfg.n_layers) if layers is None else layers)
    _check_size_and_layers(model, "cross_layer_config", d_latent, expansion, layers)
    if not layers or layers != list(range(layers[0], layers[0] + len(layers))):
        raise SiteError(f"a cross-layer transcoder covers consecutive layers in order, got {layers}")
    input_hook, output_hook = fields.pop("input_hook", "mlp.hook_in"), fields.pop("output_hook", "hook_mlp_out")
    sites = [s for layer in layers for s in (f"blocks.{layer}.{input_hook}", f"blocks.{layer}.{output_hook}")]
    info = probe_sites(model, sites)
    widths = {info[site].width for site in sites}
    if len(widths) != 1:
        raise SiteError(f"the MLP inputs and outputs of layers {layers} differ in width ({sorted(widths)})")
    (d_model,) = widths
    return CrossLayerConfig(
        d_model=d_model,
        d_latent=d_latent if d_latent is not None else expansion * d_model,
        n_layers=len(layers),
        first_layer=layers[0],
        input_hook=input_hook,
        output_hook=output_hook,
        input_space=input_space_of(model, sites[0]),
        model_name=model_name(model),
        **fields,
    )


@dataclass
class Resume:
    """Logits from the stream entering block `layer` (`[batch, pos, d_model]`) through the
    remaining blocks, the final norm and the unembedding: `resume(residual, layer)`;
    `layer == n_layers` runs only the final norm and unembedding. Made by
    `resumable_pass` from the pass it recorded, and usable after it with that pass's
    batch shape.

    `needs_whole_pass` is True where the recording pass must run every block (it records
    each block's own call), so that pass may not stop early."""

    run: Callable[[Tensor, int], Tensor]
    needs_whole_pass: bool

    def __call__(self, residual: Tensor, layer: int) -> Tensor:
        return self.run(residual, layer)


@contextlib.contextmanager
def resumable_pass(model: nn.Module) -> Iterator[Resume]:
    """Record what a forward pass inside the block needs to be resumed from any block,
    and yield a `Resume` for it.

    HookedTransformer resumes natively (`start_at_layer`). The Bridge cannot: TL 3.x
    raises and TL 4.x runs every earlier block anyway. There the blocks' own call
    arguments (position embeddings, masks) are recorded during the pass and replayed
    with a new residual, then the final norm, unembedding and logit soft-cap run.
    `check_resume` tells whether the replay reproduces a pass on a given model."""
    if not is_bridge(model):
        yield Resume(lambda residual, layer: model(residual, start_at_layer=layer, return_type="logits"), False)
        return
    calls: dict[int, tuple[tuple, dict]] = {}

    def recorder(index: int):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = {key: value for key, value in kwargs.items() if key != "hidden_states"}
            for key in ("past_key_values", "past_key_value", "layer_past"):
                if key in kwargs:
                    kwargs[key] = None
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            calls[index] = (args[1:], kwargs)

        return record

    handles = [block.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, block in enumerate(model.blocks)]
    try:
        yield Resume(lambda residual, layer: _replay(model, calls, residual, layer), True)
    finally:
        for handle in handles:
            handle.remove()


def _replay(model: nn.Module, calls: dict, residual: Tensor, layer: int) -> Tensor:
    hidden = residual
    for index in range(layer, model.cfg.n_layers):
        args, kwargs = calls[index]
        out = model.blocks[index](hidden, *args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    if getattr(model, "ln_final", None) is not None:
        hidden = model.ln_final(hidden)
    logits = model.unembed(hidden)
    cap = getattr(model.cfg, "output_logits_soft_cap", 0.0) or 0.0
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def check_resume(
    resume: Resume,
    residual: Float[Tensor, "batch pos d_model"],
    layer: int,
    logits: Float[Tensor, "batch pos d_vocab"],
) -> bool:
    """Whether resuming from `residual` (the clean stream entering block `layer`)
    reproduces the clean pass's `logits` (compared as log-probabilities, one row at a
    time so that no more than one row's temporaries exist beside the logits)."""
    resumed = resume(residual, layer)
    return all(
        torch.allclose(torch.log_softmax(a.float(), -1), torch.log_softmax(b.float(), -1), atol=1e-4, rtol=1e-4)
        for a, b in zip(resumed, logits)
    )
