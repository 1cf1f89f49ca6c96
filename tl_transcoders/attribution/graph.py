"""`Graph`: the attribution graph of one prompt in the frozen replacement model.

Nodes, in this order (the order of `adjacency`'s rows and columns):

    features  (n_features)          active transcoder latents (layer, position, latent)
    errors    (n_layers * n_pos)    one per (layer, position): MLP output - transcoder output
                                    (the whole MLP output where a layer has no transcoder)
    tokens    (n_pos)               one token-embedding node per position
    logits    (n_logits)            the top next-token logits at the last position

`adjacency[target, source]` is the direct effect of `source` on `target` in the
replacement model with attention patterns and norm scales frozen at their values on the
prompt, MLPs replaced by transcoders plus error terms (so the model is linear in the
node values): a feature target's value is its pre-activation without bias, a logit
target's value is the logit minus the mean logit over the vocabulary.

`Graph.save` writes one safetensors file: the tensors, and in its header a format tag,
a version and the other fields as JSON; `Graph.load` checks all of it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from tl_transcoders.attribution.errors import AttributionError, GraphFileError
from tl_transcoders.core.devices import checked_device
from tl_transcoders.core.files import atomic_write

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Graph",
    "TENSOR_FIELDS",
    "token_labels",
]

FORMAT_NAME = "tl-transcoders-graph"
FORMAT_VERSION = 1
TENSOR_FIELDS = ("tokens", "features", "activations", "logit_tokens", "logit_probabilities", "adjacency")


@dataclass
class Graph:
    """One prompt's attribution graph (see the module docstring for the node order)."""

    tokens: Int[Tensor, " n_pos"]
    features: Int[Tensor, "n_features 3"]  # rows of (layer, position, latent)
    activations: Float[Tensor, " n_features"]  # each feature's activation on the prompt
    n_layers: int
    logit_tokens: Int[Tensor, " n_logits"]  # vocabulary ids of the logit nodes
    logit_probabilities: Float[Tensor, " n_logits"]
    adjacency: Float[Tensor, "n_nodes n_nodes"]  # [target, source]
    prompt: str | None = None
    model_name: str | None = None
    metadata: dict = field(default_factory=dict)  # transcoder sites, options used

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.shape[0])

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_layers * self.n_pos + self.n_pos + self.n_logits

    def error_node(self, layer: int, position: int) -> int:
        """Index of the error node of (`layer`, `position`)."""
        return self.n_features + layer * self.n_pos + position

    def token_node(self, position: int) -> int:
        """Index of the token-embedding node at `position`."""
        return self.n_features + self.n_layers * self.n_pos + position

    def logit_node(self, index: int) -> int:
        """Index of the `index`-th logit node."""
        return self.n_features + (self.n_layers + 1) * self.n_pos + index

    def target_labels(self, tokenizer: Any | None = None) -> list[str]:
        """A label per target (logit) node: the token of a top-logit target (decoded by
        `tokenizer`, as `token_labels`), else the target's own label (`attribute(targets=)`)."""
        described = self.metadata.get("targets")
        if described is None:
            return token_labels(self.logit_tokens, tokenizer)
        return [t["label"] for t in described]

    def target_positions(self) -> list[int]:
        """The position of each target node: the last one for logits and logit
        differences, the target's own for a residual direction or a feature."""
        described = self.metadata.get("targets") or [{}] * self.n_logits
        return [int(t.get("position", self.n_pos - 1)) for t in described]

    def feature_node(self, layer: int, position: int, latent: int) -> int:
        """Index of the feature node (`layer`, `position`, `latent`); KeyError if absent."""
        match = (self.features == torch.tensor([layer, position, latent])).all(dim=1).nonzero()
        if match.numel() == 0:
            raise KeyError(f"feature (layer {layer}, position {position}, latent {latent}) is not a node of this graph")
        return int(match[0, 0])

    def validate(self) -> None:
        """Raise `AttributionError` if the fields disagree with each other (sizes, ranges, dtypes)."""
        if self.n_layers < 1:
            raise AttributionError(f"n_layers must be at least 1, got {self.n_layers}")
        for name in TENSOR_FIELDS:
            tensor, floating = getattr(self, name), name in ("activations", "logit_probabilities", "adjacency")
            if tensor.is_floating_point() != floating:
                kind = "a float tensor" if floating else "an integer tensor of ids"
                raise AttributionError(f"{name} must be {kind}, got dtype {tensor.dtype}")
        if self.features.ndim != 2 or self.features.shape[1] != 3:
            raise AttributionError(
                f"features must be [n_features, 3] rows of (layer, position, latent), "
                f"got shape {tuple(self.features.shape)}"
            )
        expected = {
            "tokens": (self.n_pos,),
            "activations": (self.n_features,),
            "logit_tokens": (self.n_logits,),
            "logit_probabilities": (self.n_logits,),
            "adjacency": (self.n_nodes, self.n_nodes),
        }
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise AttributionError(
                    f"{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}: "
                    f"{self.n_features} features + {self.n_layers} x {self.n_pos} errors + {self.n_pos} tokens "
                    f"+ {self.n_logits} logits"
                )
        for column, name, bound in ((0, "layers", self.n_layers), (1, "positions", self.n_pos), (2, "latents", None)):
            values = self.features[:, column]
            if self.n_features and (values.min() < 0 or (bound is not None and values.max() >= bound)):
                limit = f"[0, {bound})" if bound is not None else ">= 0"
                raise AttributionError(f"feature {name} must lie in {limit}, got {values.min()}..{values.max()}")
        for name in ("adjacency", "activations", "logit_probabilities"):
            if not torch.isfinite(getattr(self, name)).all():
                raise AttributionError(f"{name} holds NaN or inf")
        if not isinstance(self.metadata, dict):
            raise AttributionError(f"metadata must be a dict, got {type(self.metadata).__name__}")
        described = self.metadata.get("targets")
        if described is not None and (
            not isinstance(described, list)
            or len(described) != self.n_logits
            or not all(isinstance(t, dict) for t in described)
        ):
            raise AttributionError(
                f"metadata['targets'] must describe each of the {self.n_logits} target nodes (a list of dicts)"
            )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the graph to one safetensors file at `path` (tensors on the CPU, the other
        fields as JSON in its header). The file is written under a temporary name and
        renamed into place. `metadata` must be JSON-serialisable (tuples come back as lists)."""
        path = Path(path)
        try:
            fields = json.dumps(
                {
                    "n_layers": self.n_layers,
                    "prompt": self.prompt,
                    "model_name": self.model_name,
                    "metadata": self.metadata,
                }
            )
        except (TypeError, ValueError) as err:
            raise AttributionError(f"Graph.save: metadata must be JSON-serialisable ({err})") from err
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in TENSOR_FIELDS}
        header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "fields": fields}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> Graph:
        """Read a graph written by `save`. Raises `GraphFileError` naming the file and the
        problem for a missing, corrupt or foreign file, an unsupported version, or fields
        that disagree with each other."""
        path, device = Path(path), checked_device(device)
        if not path.is_file():
            raise GraphFileError(f"{path}: no such file (a graph written by Graph.save)")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise GraphFileError(
                f"{path}: cannot read the safetensors file, it may be truncated or corrupt ({err})"
            ) from err
        if header.get("format") != FORMAT_NAME:
            raise GraphFileError(f'{path}: not a tl-transcoders graph (its header has no "format": "{FORMAT_NAME}")')
        if header.get("format_version") != str(FORMAT_VERSION):
            raise GraphFileError(
                f"{path}: format_version {header.get('format_version')!r} is not supported; this version of "
                f"tl-transcoders reads version {FORMAT_VERSION}. Upgrade tl-transcoders to read newer files."
            )
        if sorted(tensors) != sorted(TENSOR_FIELDS):
            raise GraphFileError(f"{path}: expected tensors {sorted(TENSOR_FIELDS)}, found {sorted(tensors)}")
        try:
            fields = json.loads(header.get("fields", ""))
            graph = cls(
                **tensors,
                n_layers=int(fields["n_layers"]),
                prompt=fields["prompt"],
                model_name=fields["model_name"],
                metadata=fields["metadata"],
            )
            graph.validate()
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise GraphFileError(f"{path}: the graph's fields are damaged ({type(err).__name__}: {err})") from err
        return graph.to(device) if device is not None else graph

    def to(self, device: str | torch.device) -> Graph:
        """A copy of the graph with every tensor on `device`."""
        return replace(self, **{name: getattr(self, name).to(device) for name in TENSOR_FIELDS})


def token_labels(token_ids: Int[Tensor, " n"], tokenizer: Any | None = None) -> list[str]:
    """Printable strings for `token_ids`: each decoded alone by `tokenizer` (anything with a
    `decode(list[int]) -> str` method, e.g. a Hugging Face tokenizer or `model.tokenizer`)
    with newlines, tabs and carriage returns made visible; `#id` without a tokenizer."""
    ids = [int(i) for i in token_ids.tolist()]
    if tokenizer is None:
        return [f"#{i}" for i in ids]
    if not callable(getattr(tokenizer, "decode", None)):
        raise AttributionError(
            f"tokenizer must have a decode(list[int]) method (e.g. model.tokenizer), got {type(tokenizer).__name__}"
        )
    return [tokenizer.decode([i]).replace("\n", "⏎").replace("\t", "→").replace("\r", "↵") for i in ids]
