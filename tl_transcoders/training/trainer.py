"""`Trainer`: train transcoders for many layers from one forward pass per batch.

    token batches -> model (stopped after the last layer needed) -> as the pass reaches
    each layer, its transcoder's input and output -> one Adam step for that transcoder
    -> metrics, checkpoints -> transcoders saved in the model's own space.

Each layer trains from inside the forward pass as soon as its sites have fired, so a
batch's activations are held one layer at a time (as sparsify trains), not for every
layer at once. A shuffle buffer (which mixes whole batches) or a cross-layer transcoder
(whose step reads every layer) takes all its sites together after the pass instead.

A `Trainer` owns its run: `begin` (resume, logging, evaluation), `start_batch`,
`consume` (each group of sites in `site_groups`) and `end_batch` for one batch
(`train_on` does the three from captured activations), `finish` (save, record).
`TrainerGroup` drives several trainers of one model from a single forward pass per batch
(`Trainer.fit` is a group of one) and uses nothing else.

Everything that can be checked is checked before the first step: the options, the
output directory (creatable, writable, and not holding another run's checkpoint unless
`resume` or `overwrite`), the sites (as `splice` checks them) and each batch's token
ids. Checkpoints (`checkpoints.py`) hold everything the run depends on (weights,
optimiser and schedule, step, batches consumed, dead-latent counters, normalisation
scales, buffer and its random state), so a resumed run ends with the same weights as an
uninterrupted one. A run whose data ends before `max_tokens` says so (a warning, and
`complete: false` in `training.json`). Every tensor lives on the model's device.

Several processes (`torchrun`): with `distribute="data"` each process takes its rows of
every batch and gradients are summed across processes before each step; with
`distribute="layers"` each process trains its share of the layers on full batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from tl_transcoders.core.activations import SparseLatents
from tl_transcoders.core.clt import CrossLayerTranscoder
from tl_transcoders.core.config import ConfigError
from tl_transcoders.core.errors import TranscodersError, summary
from tl_transcoders.core.files import check_writable_directory
from tl_transcoders.core.placement import AnyTranscoder, Placement
from tl_transcoders.core.transcoder import Transcoder
from tl_transcoders.evaluation import compute_ablation_baselines, evaluate_splice
from tl_transcoders.evaluation.statistics import no_ranks
from tl_transcoders.hooks.sites import (
    SiteError,
    capture_groups,
    cross_layer_config,
    model_device,
    probe_sites,
    transcoder_config,
)
from tl_transcoders.hooks.splice import SpliceError, check_compatible, placements_of
from tl_transcoders.hooks.tokens import check_tokens
from tl_transcoders.training.checkpoints import (
    CHECKPOINT_FILE,
    RECORD_FILE,
    TrainingError,
    checkpoint_files,
    read_checkpoint,
    write_checkpoint,
    write_record,
)
from tl_transcoders.training.config import TrainConfig
from tl_transcoders.training.losses import training_step

__all__ = [
    "CrossLayerTrainer",
    "NonFiniteError",
    "Trainer",
    "TrainerGroup",
    "TrainingError",
    "fit_together",
]


class NonFiniteError(TranscodersError, FloatingPointError):
    """NaN or inf in the model's activations or in a training loss."""


_SAVED_MODULE = re.compile(r"layer_\d+|cross_layer")
"""The names of the directories a run saves its transcoders in."""


class Trainer:
    """Trains one transcoder per layer in `cfg.layers` on `model`.

    Usage: `Trainer(model, cfg).fit(batches)` with `batches` an iterable of `[batch,
    context]` token tensors (e.g. `tl_transcoders.io.data.token_batches`); the same
    iterable must be given again to resume (consumed batches are skipped). With
    `cfg.cross_layer` it is a `CrossLayerTrainer`, training one cross-layer transcoder
    over the layers on the same machinery."""

    def __new__(cls, model: nn.Module, cfg: TrainConfig):
        if cls is Trainer and isinstance(cfg, TrainConfig) and cfg.cross_layer:
            cls = CrossLayerTrainer
        return super().__new__(cls)

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        if not isinstance(cfg, TrainConfig):
            raise TrainingError(f"Trainer takes a TrainConfig, got {type(cfg).__name__}")
        cfg = dataclasses.replace(cfg)  # a copy, checked again: later edits of the caller's cfg change nothing
        n_layers, n_ctx = model.cfg.n_layers, model.cfg.n_ctx
        bad = [layer for layer in cfg.layers if layer >= n_layers]
        if bad:
            raise TrainingError(f"layers {bad} are out of range: the model has {n_layers} layers (0..{n_layers - 1})")
        if cfg.context_size > n_ctx:
            raise TrainingError(
                f"context_size {cfg.context_size} is longer than the model's context ({n_ctx}); "
                "use a shorter context_size"
            )
        self.model, self.cfg = model, cfg
        self.device = model_device(model)
        self.rank, self.world = _process_group()
        layers = list(cfg.layers)
        if self.world > 1 and cfg.distribute == "layers":
            if len(layers) < self.world:
                raise TrainingError(f"{len(layers)} layers cannot be shared by {self.world} processes")
            layers = layers[self.rank :: self.world]
        if self.data_parallel and cfg.batch_size % self.world:
            raise TrainingError(f"batch_size {cfg.batch_size} must be divisible by the {self.world} processes")
        self.output_dir = Path(cfg.output_dir)
        self._check_output_dir()
        self.layers = layers
        self.transcoders = self._build(layers)
        self.optimizer = torch.optim.Adam(
            [
                {"params": list(t.parameters()), "lr": cfg.learning_rate(t.cfg.d_latent)}
                for t in self.transcoders.values()
            ],
            betas=(0.9, 0.99),
            fused=True,  # one kernel per step: 5x faster than foreach on CPU
        )
        warmup = max(min(cfg.warmup_steps, cfg.total_steps // 10), 1)
        total = cfg.total_steps
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: min((step + 1) / warmup, max(total - step, 0) / max(total - warmup, 1)),
        )
        self.step = 0
        self.batches_seen = 0
        self.since_fired = {
            p.layer: torch.zeros(p.module.cfg.d_latent, dtype=torch.long, device=self.device)
            for p in placements_of(list(self.transcoders.values()))
        }
        self.scales: dict[int, tuple[float, float]] = {}
        self.buffer: dict[str, Tensor] = {}
        self.generator = torch.Generator().manual_seed(cfg.seed)  # the shuffle buffer's draws, on the CPU
        self.history: list[dict] = []
        self._logger = self._evaluate = None
        self._clock = (time.perf_counter(), 0)
        self._mid_step = self._stepping = False
        self._metrics: dict = {}

    def _build(self, layers: list[int]) -> dict[int, AnyTranscoder]:
        """One transcoder per layer on the model's device, each checked against the
        model as `splice` would check it; the sites are probed once for all layers."""
        cfg = self.cfg
        sites = {layer: cfg.sites(layer) for layer in layers}
        widths = {
            site: info.width
            for site, info in probe_sites(self.model, [s for pair in sites.values() for s in pair]).items()
        }
        transcoders: dict[int, AnyTranscoder] = {}
        for layer, (input_site, output_site) in sites.items():
            d_latent = cfg.d_latent or cfg.expansion * widths[input_site]
            if cfg.activation in ("topk", "batchtopk") and cfg.k > d_latent:
                raise TrainingError(
                    f"k={cfg.k} is larger than the {d_latent} latents of layer {layer}'s transcoder: "
                    "lower k or raise expansion / d_latent"
                )
            tc_cfg = transcoder_config(
                self.model,
                layer,
                d_latent,
                input_site,
                output_site,
                activation=cfg.activation,
                k=cfg.k,
                skip=cfg.skip,
                dtype=cfg.dtype,
            )
            transcoders[layer] = self._seeded(Transcoder, tc_cfg, layer)
        self._check_fit(transcoders)
        return transcoders

    def _seeded(self, cls: type, module_cfg, layer: int) -> AnyTranscoder:
        """A new module seeded by (seed, layer), the same start whichever process holds
        the layer, on the model's device in training mode."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed * 100_003 + layer)
            return cls(module_cfg, device="cpu").to(self.device).train()

    def _check_fit(self, transcoders: dict[int, AnyTranscoder]) -> None:
        try:
            check_compatible(self.model, list(transcoders.values()))
        except SpliceError as err:
            raise TrainingError(f"the transcoders would not fit the model: {err}") from err

    def _check_output_dir(self) -> None:
        """The output directory can be written, and holds no other run's checkpoint
        unless the run resumes it or overwrites it."""
        if not self._writes_files:
            return
        try:
            check_writable_directory(self.output_dir)
        except OSError as err:
            raise TrainingError(f"output_dir {self.output_dir} cannot be used: {err}") from err
        if self.cfg.resume or self.cfg.overwrite:
            return
        existing = checkpoint_files(self.checkpoint_path)
        if existing:
            raise TrainingError(
                f"{self.output_dir} holds the checkpoint of an earlier run ({existing[0].name}); pass "
                "resume=True to continue it, overwrite=True to start afresh, or another output_dir"
            )
        saved = [path.name for path in self._earlier_outputs()]
        if saved:
            raise TrainingError(
                f"{self.output_dir} holds the saved results of an earlier run ({', '.join(saved)}), which this "
                "run would replace; pass overwrite=True to replace them, or another output_dir"
            )

    def _earlier_outputs(self) -> list[Path]:
        """What an earlier run left in the output directory: its record and saved
        transcoders."""
        if not self.output_dir.is_dir():
            return []
        record = self.output_dir / RECORD_FILE
        saved = sorted(p for p in self.output_dir.iterdir() if p.is_dir() and _SAVED_MODULE.fullmatch(p.name))
        return ([record] if record.exists() else []) + saved

    @property
    def data_parallel(self) -> bool:
        return self.world > 1 and self.cfg.distribute == "data"

    def sum_ranks(self, total: Tensor) -> Tensor:
        """Sum of `total` over the data-parallel processes (itself otherwise)."""
        if not self.data_parallel:
            return no_ranks(total)
        total = total.clone()
        dist.all_reduce(total)
        return total

    @property
    def sites(self) -> list[str]:
        """Every hook site this trainer's transcoders read or write."""
        return [s for p in self.placements for s in (p.input_site, p.output_site)]

    @property
    def placements(self) -> list[Placement]:
        """Every layer this trainer's transcoders replace."""
        return placements_of(list(self.transcoders.values()))

    @property
    def done(self) -> bool:
        """True once the run has taken all its steps."""
        return self.step >= self.cfg.total_steps

    # --- the run ------------------------------------------------------------------------

    def fit(self, batches: Iterable[Tensor], eval_tokens: Tensor | None = None) -> list[AnyTranscoder]:
        """Train until `cfg.max_tokens`; return the transcoders, also saved to
        `output_dir/layer_{L}` in the model's own activation space. With `eval_tokens`
        (`[batch, pos]`) and `cfg.eval_every`, spliced CE is measured during training."""
        return TrainerGroup([self]).fit(batches, eval_tokens)[0]

    def begin(self, eval_tokens: Tensor | None = None) -> None:
        """Start the run: resume from the checkpoint (with `cfg.resume`) or clear an
        earlier run's (with `cfg.overwrite`), and set up logging and evaluation."""
        cfg = self.cfg
        if (eval_tokens is None) != (cfg.eval_every == 0):
            raise TrainingError(
                "spliced-CE evaluation during training needs both eval_every > 0 and eval_tokens given to fit; "
                f"got eval_every={cfg.eval_every} and eval_tokens {'not given' if eval_tokens is None else 'given'}"
            )
        if cfg.resume and checkpoint_files(self.checkpoint_path):
            self.load_checkpoint()
        elif cfg.resume:
            warnings.warn(f"resume=True but {self.checkpoint_path} does not exist: starting a fresh run", stacklevel=3)
        elif cfg.overwrite and self._writes_files:
            for path in checkpoint_files(self.checkpoint_path):
                path.unlink()
        self._logger = _wandb_logger(cfg) if self.rank == 0 else None
        self._evaluate = self._evaluator(eval_tokens) if eval_tokens is not None and cfg.eval_every else None
        self._clock = (time.perf_counter(), self.step)

    def check_batch(self, tokens: Tensor, index: int) -> Tensor:
        """Token batch `index` checked (ids, shape) and on the model's device: this
        process's rows of it under data parallelism."""
        tokens = check_tokens(self.model, tokens, where=f"training batch {index}", min_positions=2)
        expected = (self.cfg.batch_size, self.cfg.context_size)
        if tuple(tokens.shape) != expected:
            raise TrainingError(
                f"training batch {index} has shape {tuple(tokens.shape)}, but batch_size x context_size is "
                f"{expected}; make the batches with token_batches(..., context_size, batch_size)"
            )
        return tokens.chunk(self.world)[self.rank] if self.data_parallel else tokens

    @property
    def streams(self) -> bool:
        """Whether each layer trains as soon as the forward pass reaches it, so that a
        batch's activations are held one layer at a time (no shuffle buffer, which
        mixes whole batches)."""
        return self.cfg.shuffle_buffer == 0

    def site_groups(self) -> list[tuple[str, ...]]:
        """The units of one batch's activations this trainer consumes, in the order of
        `placements`: each layer's (input, output) sites when it `streams`, else all its
        sites at once."""
        if self.streams:
            return [(p.input_site, p.output_site) for p in self.placements]
        return [tuple(self.sites)]

    def train_on(self, activations: dict[str, Tensor]) -> dict | None:
        """One batch of captured activations (site -> `[tokens, width]`): through the
        shuffle buffer, then a training step, metrics and checkpoint. Returns the step's
        metrics (None while the buffer fills). The same as `start_batch`, `consume` of
        every site group, then `end_batch`."""
        self.start_batch()
        for i, group in enumerate(self.site_groups()):
            self.consume(i, {site: activations[site] for site in group})
        return self.end_batch()

    def start_batch(self) -> None:
        """Begin a batch: its site groups follow through `consume`, then `end_batch`."""
        self._mid_step = True
        self.batches_seen += 1
        self._stepping = False
        self._metrics = {"fvu": 0.0}
        self.optimizer.zero_grad(set_to_none=True)

    def consume(self, group: int, activations: dict[str, Tensor]) -> None:
        """Site group `group` of the current batch (as `site_groups` lists them): a
        streaming trainer's step for that layer, else the shuffle buffer and the step of
        every layer."""
        if self.streams:
            self._stepping = True
            self._layer_step(self.placements[group], activations)
            return
        batch = self._mix(activations)
        if batch is not None:
            self._stepping = True
            self._train_step(batch)

    def end_batch(self) -> dict | None:
        """End the batch: the schedule, step count, logged metrics and checkpoint.
        Returns the step's metrics, or None where no step was taken (the shuffle buffer
        still filling)."""
        cfg, metrics = self.cfg, self._metrics
        if not self._stepping:
            self._mid_step = False
            return None
        self.schedule.step()
        self.step += 1
        self._mid_step = False
        evaluate_now = self._evaluate is not None and self.step % cfg.eval_every == 0
        if evaluate_now or self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
            start, start_step = self._clock
            metrics["tokens_per_s"] = (self.step - start_step) * cfg.tokens_per_step / (time.perf_counter() - start)
            metrics["step"] = self.step
            if evaluate_now:
                metrics.update(self._evaluate())
            self.history.append(metrics)
            if self._logger is not None:
                self._logger.log(metrics, step=self.step)
        if self.step % cfg.checkpoint_every == 0 and self._writes_files:
            self.save_checkpoint()
        return metrics

    def interrupted(self) -> None:
        """The run was stopped (Ctrl-C) between batches: keep its progress in a checkpoint."""
        if self._writes_files and not self._mid_step and self.step > 0:
            self.save_checkpoint()

    def finish(self) -> list[AnyTranscoder]:
        """End the run: save the transcoders and the run record; warn if the data ended
        before `max_tokens`."""
        if self._logger is not None:
            self._logger.finish()
        if self.step == 0:
            raise TrainingError(
                "no training step ran: the data gave no full batch of "
                f"{self.cfg.batch_size} x {self.cfg.context_size} tokens"
                + (" (or too few to fill the shuffle buffer)" if self.cfg.shuffle_buffer else "")
            )
        if not self.done:
            warnings.warn(
                f"the data ran out after {self.step} of {self.cfg.total_steps} steps "
                f"({self.step * self.cfg.tokens_per_step:,} of {self.cfg.max_tokens:,} tokens); the transcoders "
                f"are saved, and {self.output_dir / RECORD_FILE} records the run as incomplete",
                stacklevel=3,
            )
        transcoders = self.save()
        if self._writes_files:
            write_record(self.output_dir / RECORD_FILE, self.record())
        return transcoders

    def record(self) -> dict:
        """What this run did, as saved in `training.json`."""
        return {
            "complete": self.done,
            "steps": self.step,
            "total_steps": self.cfg.total_steps,
            "tokens": self.step * self.cfg.tokens_per_step,
            "max_tokens": self.cfg.max_tokens,
            "layers": list(self.layers),
            "config": self.cfg.to_dict(),
            "last_metrics": self.history[-1] if self.history else None,
        }

    def _evaluator(self, eval_tokens: Tensor):
        """A function returning spliced-CE metrics of the current transcoders on
        `eval_tokens`; the ablation baselines are computed once here."""
        baselines = compute_ablation_baselines(self.model, eval_tokens, list(self.layers))

        def evaluate() -> dict:
            report = evaluate_splice(self.model, self.folded_all(), eval_tokens, baselines)
            metrics = {"ce_clean": report.ce_clean, "ce_all_spliced": report.ce_all_spliced}
            for layer, row in report.layers.items():
                metrics[f"layer{layer}/ce_spliced"] = row.ce_spliced
                metrics[f"layer{layer}/ce_recovered"] = row.ce_recovered
            return metrics

        return evaluate

    def _mix(self, activations: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Pass activations through the shuffle buffer: keep `shuffle_buffer` batches,
        return one batch of tokens drawn at random from them (None while filling)."""
        if self.cfg.shuffle_buffer == 0:
            return activations
        n = self.cfg.tokens_per_step // (self.world if self.data_parallel else 1)
        for site, value in activations.items():
            self.buffer[site] = torch.cat([self.buffer[site], value]) if site in self.buffer else value
        size = next(iter(self.buffer.values())).shape[0]
        if size < n * self.cfg.shuffle_buffer:
            return None
        order = torch.randperm(size, generator=self.generator, device="cpu").to(self.device)
        taken, kept = order[:n], order[n:]
        batch = {site: value[taken] for site, value in self.buffer.items()}
        self.buffer = {site: value[kept] for site, value in self.buffer.items()}
        return batch

    def _train_step(self, activations: dict[str, Tensor]) -> None:
        """One optimiser step for every layer's transcoder, one layer after another."""
        for place in self.placements:
            self._layer_step(place, activations)

    def _layer_step(self, place: Placement, activations: dict[str, Tensor]) -> None:
        """One optimiser step for the transcoder of `place` (initialised from this batch
        if it is the first). Its update is taken right after its backward pass and its
        gradients are freed, so one layer's gradients are alive at a time (Adam's update
        of a parameter does not depend on the others')."""
        cfg, layer = self.cfg, place.layer
        transcoder = self.transcoders[layer]
        if layer not in self.scales:
            self._initialise_place(place, activations)
        x, y = self._inputs(layer, activations)
        dead = self.since_fired[layer] >= cfg.dead_tokens
        with torch.enable_grad():
            out = training_step(transcoder, x, y, dead, cfg, self.sum_ranks)
            self._backward(out.loss, f"layer {layer}'s transcoder")
        if transcoder.cfg.activation == "batchtopk":
            self._calibrate_threshold(transcoder.threshold, out.latents.values)
        self._update(transcoder)
        self._track(layer, out.latents, dead, out.fvu, x.shape[0], self._metrics)

    def _backward(self, loss: Tensor, owner: str) -> None:
        """Backpropagate a training loss; a non-finite one stops the run (the last
        checkpoint is kept) with what to do. `owner` names whose loss it is."""
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"the loss of {owner} is {loss.item()} at step {self.step + 1}: the run diverged. "
                f"{self.kept_checkpoint_note()} Lower lr (now {self.optimizer.param_groups[0]['lr']:.3g})."
            )
        loss.backward()

    def _track(self, layer: int, latents: SparseLatents, dead: Tensor, fvu: Tensor, n: int, metrics: dict) -> None:
        """After a step: layer `layer`'s firing counters, and its FVU, L0 and dead
        fraction in `metrics` (with its share of the mean FVU)."""
        fired = torch.zeros(dead.shape, dtype=torch.long, device=self.device)
        fired[latents.indices[latents.values > 0]] = 1
        fired = self.sum_ranks(fired) > 0
        n_tokens = self.sum_ranks(torch.tensor(n, dtype=torch.double, device=self.device))
        self.since_fired[layer] += int(n_tokens.item())
        self.since_fired[layer][fired] = 0
        active = self.sum_ranks((latents.values > 0).sum().double())
        metrics[f"layer{layer}/fvu"] = fvu.item()
        metrics[f"layer{layer}/l0"] = (active / n_tokens).item()
        metrics[f"layer{layer}/dead_fraction"] = dead.float().mean().item()
        metrics["fvu"] += fvu.item() / len(self.layers)

    def _update(self, transcoder: AnyTranscoder) -> None:
        """Adam's step for one transcoder (gradients summed over data-parallel processes
        first), then its gradients freed and JumpReLU thresholds kept non-negative."""
        params = list(transcoder.parameters())
        if self.data_parallel:
            for param in params:
                if param.grad is not None:
                    dist.all_reduce(param.grad)
        self.optimizer.step()  # only this transcoder's parameters hold gradients now
        for param in params:
            param.grad = None
        if transcoder.cfg.activation == "jumprelu":
            with torch.no_grad():
                transcoder.threshold.clamp_(min=0)

    def _calibrate_threshold(self, threshold: Tensor, values: Tensor) -> None:
        """BatchTopK's inference threshold (one layer's): a running mean of the smallest
        activation the batch selection kept, so that eval mode keeps about k latents per
        token."""
        kept = values[values > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min()
        with torch.no_grad():
            if self.step == 0:
                threshold.fill_(smallest)
            else:
                threshold.mul_(0.99).add_(0.01 * smallest)

    def _inputs(self, layer: int, activations: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Layer `layer`'s normalised input and target, in its transcoder's dtype."""
        place = next(p for p in self.placements if p.layer == layer)
        s_in, s_out = self.scales[layer]
        dtype = place.module.W_enc.dtype
        x = activations[place.input_site].to(dtype) / s_in
        y = activations[place.output_site].to(dtype) / s_out
        return x, y

    def _initialise_place(self, place: Placement, activations: dict[str, Tensor]) -> None:
        """Data-dependent start on the first batch, for the layer of `place`:
        normalisation scales, b_dec = mean output, b_enc centring the inputs, a zero
        decoder for transcoders and the encoder's transpose for SAEs (as sparsify does);
        a skip term starts at the least-squares linear map from input to output
        (ridge-regularised), so the latents only have to learn what a linear map cannot."""
        p = _layer_parameters(place)
        x = activations[place.input_site].double()
        y = activations[place.output_site].double()
        n = self.sum_ranks(x.new_tensor(float(x.shape[0])))
        if self.cfg.normalize:
            s_in = (self.sum_ranks(x.pow(2).sum()) / (n * place.d_in)).sqrt().item()
            s_out = (self.sum_ranks(y.pow(2).sum()) / (n * place.d_out)).sqrt().item()
        else:
            s_in = s_out = 1.0
        self.scales[place.layer] = (s_in, s_out)
        x_mean = (self.sum_ranks(x.sum(0)) / n / s_in).to(p.W_enc.dtype)
        y_mean = self.sum_ranks(y.sum(0)) / n
        with torch.no_grad():
            p.b_dec.copy_(y_mean / s_out)
            if place.input_site == place.output_site:  # an SAE
                p.W_dec.copy_(p.W_enc / p.W_enc.norm(dim=-1, keepdim=True))
            else:
                p.W_dec.zero_()
            p.b_enc.copy_(-(p.W_enc @ x_mean))
            if p.W_skip is not None:
                skip, offset = self._least_squares(x / s_in, y / s_out, n)
                p.W_skip.copy_(skip)
                p.b_dec.copy_(offset)

    def _least_squares(self, x: Tensor, y: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
        """The ridge regression `y ~ x @ W.T + b` over the rows of every process:
        returns (W [d_out, d_in], b [d_out]). The ridge is 1e-3 of the mean input
        variance, enough to keep rarely used input directions at zero."""
        x_mean = self.sum_ranks(x.sum(0)) / n
        y_mean = self.sum_ranks(y.sum(0)) / n
        xc = x - x_mean
        gram = self.sum_ranks(xc.T @ xc)
        cross = self.sum_ranks(xc.T @ (y - y_mean))
        ridge = 1e-3 * gram.diagonal().mean().clamp(min=1e-12)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        weight = torch.linalg.solve(gram + ridge * eye, cross).T
        return weight, y_mean - weight @ x_mean

    # --- saving --------------------------------------------------------------------------

    def folded_all(self) -> list[AnyTranscoder]:
        """Every transcoder with normalisation folded into its weights, in eval mode:
        they read and write the model's own activations."""
        return [self.folded(layer) for layer in self.transcoders]

    def folded(self, layer: int) -> Transcoder:
        """The transcoder for `layer` with normalisation folded into its weights, in eval
        mode: it reads and writes the model's own activations."""
        transcoder = self.transcoders[layer]
        s_in, s_out = self.scales.get(layer, (1.0, 1.0))
        with torch.device("meta"):
            result = Transcoder(transcoder.cfg)
        state = {name: t.detach().clone() for name, t in transcoder.state_dict().items()}
        state["W_enc"] /= s_in
        state["W_dec"] *= s_out
        state["b_dec"] *= s_out
        if "W_skip" in state:
            state["W_skip"] *= s_out / s_in
        result.load_state_dict(state, assign=True)
        return result.eval()

    def directory_of(self, transcoder: AnyTranscoder) -> Path:
        """Where `save` puts a transcoder: `output_dir/layer_{L}`."""
        return self.output_dir / f"layer_{transcoder.cfg.layer}"

    @property
    def _writes_files(self) -> bool:
        """Data-parallel processes hold identical weights: only the first one writes."""
        return not self.data_parallel or self.rank == 0

    def save(self) -> list[AnyTranscoder]:
        """Save every folded transcoder to `output_dir/layer_{L}` and return them (this
        process's layers when layers are distributed)."""
        result = self.folded_all()
        if self._writes_files:
            for transcoder in result:
                transcoder.save(self.directory_of(transcoder))
        return result

    @property
    def checkpoint_path(self) -> Path:
        """`checkpoint.pt`, or one file per process when layers are distributed."""
        if self.world > 1 and self.cfg.distribute == "layers":
            return self.output_dir / f"checkpoint.rank{self.rank}.pt"
        return self.output_dir / CHECKPOINT_FILE

    def save_checkpoint(self) -> Path:
        """Write the full training state to `output_dir/checkpoint.pt`, keeping the
        previous checkpoint until the new one is complete."""
        state = {
            "config": self.cfg.to_dict(),
            "transcoders": {layer: t.state_dict() for layer, t in self.transcoders.items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "step": self.step,
            "batches_seen": self.batches_seen,
            "since_fired": self.since_fired,
            "scales": self.scales,
            "buffer": self.buffer,
            "generator": self.generator.get_state(),
            "history": self.history,
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return write_checkpoint(self.checkpoint_path, state)

    def load_checkpoint(self) -> None:
        """Restore the state written by `save_checkpoint` (or the previous checkpoint if
        the latest cannot be read)."""
        path = self.checkpoint_path
        state = read_checkpoint(path)
        ignored = ("resume", "overwrite")
        saved = {k: v for k, v in state["config"].items() if k not in ignored}
        current = {k: v for k, v in self.cfg.to_dict().items() if k not in ignored}
        if saved != current:
            changed = sorted(k for k in current if saved.get(k) != current[k])
            raise TrainingError(
                f"{path} was written by a run with other options ({changed}); resume with the same "
                "TrainConfig, or start afresh with overwrite=True"
            )
        try:
            for layer, transcoder in self.transcoders.items():
                transcoder.load_state_dict(state["transcoders"][layer])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise TrainingError(
                f"{path} does not hold this run's transcoders and optimiser ({summary(err)}); the file was "
                "changed after it was written: start afresh with overwrite=True"
            ) from err
        self.step, self.batches_seen = state["step"], state["batches_seen"]
        self.since_fired = {layer: count.to(self.device) for layer, count in state["since_fired"].items()}
        self.scales = state["scales"]
        self.buffer = {site: value.to(self.device) for site, value in state["buffer"].items()}
        self.history = state["history"]
        self.generator.set_state(state["generator"])

    def kept_checkpoint_note(self) -> str:
        """What an error that stops the run says about the checkpoint it leaves."""
        existing = checkpoint_files(self.checkpoint_path)
        if existing:
            return f"The last checkpoint is kept at {existing[0]}; fix the input and resume with resume=True."
        return "No checkpoint had been written yet."


class _LayerParameters(NamedTuple):
    """Views of the parameters that replace one layer: its encoder, its decoders (`W_dec`
    [d_latent, d_out], or a cross-layer transcoder's [d_latent, n_targets, d_model]),
    its output bias and skip term (None without one)."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    W_skip: Tensor | None


def _layer_parameters(place: Placement) -> _LayerParameters:
    module, i = place.module, place.index
    W_skip = getattr(module, "W_skip", None)
    if isinstance(module, Transcoder):
        return _LayerParameters(module.W_enc, module.b_enc, module.W_dec, module.b_dec, W_skip)
    return _LayerParameters(
        module.W_enc[i], module.b_enc[i], module.W_dec[i], module.b_dec[i], None if W_skip is None else W_skip[i]
    )


class CrossLayerTrainer(Trainer):
    """Trains one `CrossLayerTranscoder` over `cfg.layers` (`cfg.cross_layer`), on the
    `Trainer`'s machinery: one forward pass per batch, normalisation per layer, AuxK,
    BatchTopK thresholds and dead-latent counters per source layer, checkpoints and
    exact resume, data parallelism. Saved to `output_dir/cross_layer`.

    `distribute="layers"` does not apply (the layers share one module): every process
    trains the whole transcoder."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        if cfg.distribute == "layers" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise TrainingError("distribute='layers' cannot split one cross-layer transcoder: use distribute='data'")
        super().__init__(model, cfg)

    def _build(self, layers: list[int]) -> dict[int, AnyTranscoder]:
        cfg = self.cfg
        try:
            clt_cfg = cross_layer_config(
                self.model,
                layers,
                cfg.d_latent,
                expansion=None if cfg.d_latent else cfg.expansion,
                activation=cfg.activation,
                k=cfg.k,
                skip=cfg.skip,
                dtype=cfg.dtype,
            )
        except (SiteError, ConfigError) as err:
            raise TrainingError(f"cannot build the cross-layer transcoder: {err}") from err
        transcoders = {layers[0]: self._seeded(CrossLayerTranscoder, clt_cfg, layers[0])}
        self._check_fit(transcoders)
        return transcoders

    @property
    def clt(self) -> CrossLayerTranscoder:
        return next(iter(self.transcoders.values()))

    streams = False  # its step needs every layer's activations at once

    def _train_step(self, activations: dict[str, Tensor]) -> None:
        """One optimiser step of the cross-layer transcoder on every layer at once."""
        cfg, clt = self.cfg, self.clt
        for place in self.placements:
            if place.layer not in self.scales:
                self._initialise_place(place, activations)
        pairs = [self._inputs(layer, activations) for layer in self.layers]
        x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        dead = torch.stack([self.since_fired[layer] >= cfg.dead_tokens for layer in self.layers])
        with torch.enable_grad():
            out = training_step(clt, x, y, dead, cfg, self.sum_ranks)
            self._backward(out.loss, "the cross-layer transcoder")
        if clt.cfg.activation == "batchtopk":
            for i, latents in enumerate(out.latents):
                self._calibrate_threshold(clt.threshold[i], latents.values)
        self._update(clt)
        for i, layer in enumerate(self.layers):
            self._track(layer, out.latents[i], dead[i], out.fvu[i], x.shape[1], self._metrics)

    def folded_all(self) -> list[AnyTranscoder]:
        """The cross-layer transcoder with each layer's normalisation folded in: layer
        i's encoder divided by its input scale, every decoder into layer t and t's bias
        multiplied by t's output scale, t's skip term by its output over input scale."""
        clt = self.clt
        scales = [self.scales.get(layer, (1.0, 1.0)) for layer in self.layers]
        s_in = torch.tensor([s[0] for s in scales], dtype=clt.W_enc.dtype, device=self.device)
        s_out = torch.tensor([s[1] for s in scales], dtype=clt.W_enc.dtype, device=self.device)
        state = {name: t.detach().clone() for name, t in clt.state_dict().items()}
        state["W_enc"] /= s_in[:, None, None]
        state["b_dec"] *= s_out[:, None]
        for i in range(clt.cfg.n_layers):
            state[f"W_dec.{i}"] *= s_out[i:, None]
        if "W_skip" in state:
            state["W_skip"] *= (s_out / s_in)[:, None, None]
        return [CrossLayerTranscoder.from_tensors(clt.cfg, state)]

    def directory_of(self, transcoder: AnyTranscoder) -> Path:
        """Where `save` puts the cross-layer transcoder: `output_dir/cross_layer`."""
        return self.output_dir / "cross_layer"


class TrainerGroup:
    """Several `Trainer`s of the same model fed from one forward pass per batch: e.g. an
    SAE, a transcoder and a skip transcoder of the same layers on the same tokens.

    The trainers must share the model, batch and context size (they see the same token
    batches) and have distinct `output_dir`s; each keeps its own optimiser, schedule,
    metrics (`trainer.history`) and checkpoints, and resumes from its own (their
    consumed-batch counts must then agree)."""

    def __init__(self, trainers: Sequence[Trainer]):
        trainers = list(trainers)
        if not trainers:
            raise TrainingError("a TrainerGroup needs at least one trainer")
        first = trainers[0]
        for other in trainers[1:]:
            if other.model is not first.model:
                raise TrainingError("every trainer of a group must train on the same model object")
            if (other.cfg.batch_size, other.cfg.context_size) != (first.cfg.batch_size, first.cfg.context_size):
                raise TrainingError("every trainer of a group must use the same batch_size and context_size")
        directories = [t.output_dir.resolve() for t in trainers]
        if len(set(directories)) != len(directories):
            raise TrainingError("give every trainer of a group its own output_dir")
        self.trainers = trainers

    def fit(self, batches: Iterable[Tensor], eval_tokens: Tensor | None = None) -> list[list[AnyTranscoder]]:
        """Train every trainer until its `max_tokens` (or the end of `batches`); return
        each trainer's transcoders, in order. Ctrl-C between batches saves a checkpoint
        of every trainer before it stops the run."""
        trainers = self.trainers
        for trainer in trainers:
            trainer.begin(eval_tokens)
        resumed = {t.batches_seen for t in trainers}
        if len(resumed) > 1:
            raise TrainingError(
                f"the trainers' checkpoints consumed different numbers of batches ({sorted(resumed)}); "
                "resume them separately or start again"
            )
        with _tf32(any(t.cfg.tf32 for t in trainers)):
            self._loop(batches, skip=resumed.pop())
        return [trainer.finish() for trainer in trainers]

    def _loop(self, batches: Iterable[Tensor], skip: int) -> None:
        """Feed every batch after the first `skip` to the trainers still running."""
        trainers, first = self.trainers, self.trainers[0]
        progress = tqdm(
            total=max(t.cfg.total_steps for t in trainers), initial=first.step, desc="training", unit="step"
        )
        try:
            for seen, tokens in enumerate(batches, start=1):
                if seen <= skip:
                    continue
                active = [t for t in trainers if not t.done]
                if not active:
                    break
                tokens = first.check_batch(tokens, seen - 1)
                logged = self._train_batch(active, tokens, seen - 1)
                progress.n = max(t.step for t in trainers)
                progress.refresh()
                if logged:
                    fvu = sum(m["fvu"] for m in logged) / len(logged)
                    progress.set_postfix(fvu=f"{fvu:.3f}", tok_s=f"{logged[0]['tokens_per_s']:.0f}")
        except KeyboardInterrupt:
            for trainer in trainers:
                trainer.interrupted()
            raise
        finally:
            progress.close()

    def _train_batch(self, active: list[Trainer], tokens: Tensor, index: int) -> list[dict]:
        """Token batch `index` through one forward pass of the model, each trainer's site
        groups consumed as the pass reaches them; the metrics of the trainers that
        logged this step."""
        routes = [(trainer, i, group) for trainer in active for i, group in enumerate(trainer.site_groups())]
        checked: set[str] = set()

        def consume(route: int, activations: dict[str, Tensor]) -> None:
            trainer, group, _ = routes[route]
            for site, value in activations.items():
                if site not in checked and not torch.isfinite(value).all():
                    raise NonFiniteError(
                        f"the model produced NaN or inf activations at {site} on token batch {index}. "
                        + " ".join(t.kept_checkpoint_note() for t in active)
                    )
                checked.add(site)
            trainer.consume(group, activations)

        for trainer in active:
            trainer.start_batch()
        capture_groups(self.trainers[0].model, tokens, [group for _, _, group in routes], consume)
        metrics = [trainer.end_batch() for trainer in active]
        return [m for m in metrics if m is not None and "tokens_per_s" in m]


@contextlib.contextmanager
def _tf32(allow: bool) -> Iterator[None]:
    """TF32 matrix products on CUDA for the block when `allow`; the previous setting after."""
    if not allow:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def fit_together(
    trainers: Sequence[Trainer], batches: Iterable[Tensor], eval_tokens: Tensor | None = None
) -> list[list[AnyTranscoder]]:
    """`TrainerGroup(trainers).fit(batches, eval_tokens)`."""
    return TrainerGroup(trainers).fit(batches, eval_tokens)


def _process_group() -> tuple[int, int]:
    """(rank, world size); joins the process group `torchrun` set up, if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _wandb_logger(cfg: TrainConfig):
    """A wandb run when `cfg.wandb_project` is set, else None."""
    if cfg.wandb_project is None:
        return None
    try:
        import wandb
    except ImportError as err:
        raise ImportError(
            "wandb_project is set but wandb is not installed: pip install 'tl-transcoders[wandb]'"
        ) from err
    return wandb.init(project=cfg.wandb_project, config=cfg.to_dict())
