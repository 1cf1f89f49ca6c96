"""`TrainConfig`: every option of a training run (also the CLI's option set)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from tl_transcoders.core.config import ACTIVATIONS, ConfigError, default_input_site, default_output_site


@dataclass
class TrainConfig:
    """Options of a training run.

    Dictionary: `d_latent` latents per transcoder, or `expansion * d_in` when None.
    Sites: `input_site` / `output_site` are templates with `{layer}` (defaults: the MLP's
    exact input and `hook_mlp_out`); `sae=True` trains SAEs on the output site.
    Optimiser: Adam (betas 0.9, 0.99) with `lr` (None: 3e-3 / sqrt(d_latent / 2**14),
    scaled to the dictionary size as in sparsify), linear warm-up over `warmup_steps`
    (at most 10% of the run) and linear decay to zero.
    Losses: FVU, plus `auxk_alpha` x AuxK for TopK (revives latents dead for
    `dead_tokens` tokens), `l1_coefficient` x L1 for ReLU, `l0_coefficient` x L0 (with a
    straight-through threshold gradient of `jumprelu_bandwidth`) for JumpReLU.
    `normalize` (default on): train on inputs and outputs scaled to unit mean squared
    norm per dimension; the scales are folded back into the weights when saving.
    `shuffle_buffer`: mix activations of this many batches before training on them.
    Metrics (FVU, L0, dead fraction, tokens/s) every `log_every` steps; spliced CE on
    held-out tokens every `eval_every` steps (0: never) when `fit` gets `eval_tokens`;
    to Weights & Biases when `wandb_project` is set (`pip install tl-transcoders[wandb]`).
    Checkpoints go to `output_dir/checkpoint.pt` every `checkpoint_every` steps; with
    `resume`, a run continues from it and ends with the same weights as an
    uninterrupted run.
    Under `torchrun` (several processes), `distribute="data"` splits each batch's rows
    across processes and sums gradients (the result matches one process with the same
    global batch, for every activation but BatchTopK, whose selection is per process);
    `distribute="layers"` gives each process its share of `layers` and the full batch.
    """

    layers: list[int]
    activation: str = "topk"
    k: int = 32
    expansion: int = 16
    d_latent: int | None = None
    skip: bool = True
    sae: bool = False
    input_site: str | None = None
    output_site: str | None = None
    batch_size: int = 32
    context_size: int = 128
    max_tokens: int = 1_000_000
    lr: float | None = None
    warmup_steps: int = 1000
    auxk_alpha: float = 1 / 32
    dead_tokens: int = 1_000_000
    l1_coefficient: float = 1e-3
    l0_coefficient: float = 1e-3
    jumprelu_bandwidth: float = 1e-3
    normalize: bool = True
    shuffle_buffer: int = 0
    log_every: int = 20
    eval_every: int = 0
    wandb_project: str | None = None
    checkpoint_every: int = 100
    output_dir: str = "transcoders"
    resume: bool = False
    distribute: str = "data"
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.layers or any(not isinstance(layer, int) or layer < 0 for layer in self.layers):
            raise ConfigError(f"layers must be a non-empty list of layer numbers, got {self.layers!r}")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers has duplicates: {self.layers}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for name in ("k", "expansion", "batch_size", "max_tokens", "log_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.distribute not in ("data", "layers"):
            raise ConfigError(f"distribute must be 'data' or 'layers', got {self.distribute!r}")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be 0 (never) or positive, got {self.eval_every}")
        if self.context_size < 2:
            raise ConfigError(f"context_size must be at least 2, got {self.context_size}")
        if self.sae and self.skip:
            raise ConfigError("an SAE cannot have a skip term: pass skip=False with sae=True")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_size

    @property
    def total_steps(self) -> int:
        return max(self.max_tokens // self.tokens_per_step, 1)

    def sites(self, layer: int) -> tuple[str, str]:
        """The input and output site of the transcoder for `layer`."""
        output_site = (self.output_site or default_output_site(layer)).format(layer=layer)
        if self.sae:
            return output_site, output_site
        return (self.input_site or default_input_site(layer)).format(layer=layer), output_site

    def learning_rate(self, d_latent: int) -> float:
        return self.lr if self.lr is not None else 3e-3 / math.sqrt(d_latent / 2**14)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
