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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor


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

    def feature_node(self, layer: int, position: int, latent: int) -> int:
        """Index of the feature node (`layer`, `position`, `latent`); KeyError if absent."""
        match = (self.features == torch.tensor([layer, position, latent])).all(dim=1).nonzero()
        if match.numel() == 0:
            raise KeyError(f"feature (layer {layer}, position {position}, latent {latent}) is not a node of this graph")
        return int(match[0, 0])
