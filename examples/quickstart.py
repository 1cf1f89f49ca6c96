"""Quickstart: make a transcoder for a model, splice it in, read the CE report.

Runs offline on a tiny random model; pass a Hugging Face name to use a real one:
    python examples/quickstart.py            # tiny random model
    python examples/quickstart.py gpt2       # needs the Hugging Face Hub
"""

import sys

import torch

from tl_transcoders import Transcoder, evaluate_splice, splice, transcoder_config
from tl_transcoders.hooks.models import load_model, tiny_random_model

model = load_model(sys.argv[1]) if len(sys.argv) > 1 else tiny_random_model()
layer = model.cfg.n_layers // 2
cfg = transcoder_config(model, layer, d_latent=8 * model.cfg.d_model, k=32, skip=True)
transcoder = Transcoder(cfg).eval()
print(transcoder)

tokens = torch.randint(0, model.cfg.d_vocab, (4, 64))
clean = model(tokens)
with splice(model, [transcoder], error_term=True):
    assert torch.equal(model(tokens), clean)  # the error term keeps outputs exact
with splice(model, [transcoder]):
    print("max logit change when spliced:", (model(tokens) - clean).abs().max().item())

report = evaluate_splice(model, [transcoder], tokens)
print(report.to_dict())
