"""The `tl-transcoders` command: `demo`, `train` and `eval`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

import torch

from tl_transcoders.app.demo import run_demo
from tl_transcoders.evaluation import evaluate_splice
from tl_transcoders.hooks.models import load_model
from tl_transcoders.training import TrainConfig, Trainer
from tl_transcoders.core.transcoder import Transcoder


def read_tokens(args: argparse.Namespace, model: torch.nn.Module) -> list[torch.Tensor]:
    """Token batches from `--tokens` (a saved `[batch, pos]` tensor) or `--text` (a text
    file cut into rows of `--seq-len` tokens, each starting with the BOS token)."""
    if args.tokens:
        tokens = torch.load(args.tokens, weights_only=True)
        if not isinstance(tokens, torch.Tensor):
            raise SystemExit(f"{args.tokens}: expected a saved tensor of token ids")
        return list(tokens.split(args.batch_size))
    ids = model.tokenizer(Path(args.text).read_text())["input_ids"]
    bos = model.tokenizer.bos_token_id
    width = args.seq_len - (bos is not None)
    rows = [ids[i : i + width] for i in range(0, len(ids) - width + 1, width)]
    if not rows:
        raise SystemExit(f"{args.text}: fewer than {width} tokens of text")
    tokens = torch.tensor([([bos] if bos is not None else []) + row for row in rows])
    return list(tokens.split(args.batch_size))


def cmd_eval(args: argparse.Namespace) -> None:
    model = load_model(args.model, device=args.device)
    transcoders = [Transcoder.load(path, device=args.device) for path in args.transcoders]
    report = evaluate_splice(model, [t.eval() for t in transcoders], read_tokens(args, model))
    json.dump(report.to_dict(), sys.stdout, indent=2)
    print()


def parse_layers(text: str) -> list[int]:
    """`"0-29"`, `"3,9,15"` or a mix (`"0-3,8"`) -> a list of layer numbers."""
    layers: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            layers.extend(range(int(first), int(last or first) + 1))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad layer list {text!r}: use e.g. 0-29 or 3,9,15") from None
    return layers


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--option` per dataclass field, typed from its annotation."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = None if f.default is dataclasses.MISSING else f.default
        if f.name == "layers":
            parser.add_argument(flag, type=parse_layers, required=True, help="e.g. 0-29 or 3,9,15")
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            parser.add_argument(flag, type=base, default=default, help=f"default: {default}")


def cmd_train(args: argparse.Namespace) -> None:
    from tl_transcoders.io.data import load_text_dataset, token_batches

    model = load_model(args.model, device=args.device)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    dataset = load_text_dataset(args.dataset, split=args.split, streaming=args.streaming)
    batches = token_batches(
        dataset, model.tokenizer, cfg.context_size, cfg.batch_size, text_column=args.text_column
    )
    transcoders = Trainer(model, cfg).fit(batches)
    for transcoder in transcoders:
        print(f"saved {Path(cfg.output_dir) / f'layer_{transcoder.cfg.layer}'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tl-transcoders", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="end-to-end run on an embedded default")
    demo.add_argument("--output", default="demo-output", help="output directory")
    demo.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2",
                      help="SmolLM2-135M (extra [demo]) or a tiny random model")
    demo.add_argument("--layer", type=int, default=None, help="layer to train (default: the middle one)")
    demo.add_argument("--tokens", type=int, default=400_000, help="training tokens")
    demo.add_argument("--expansion", type=int, default=8)
    demo.add_argument("--k", type=int, default=32)
    demo.set_defaults(run=lambda args: run_demo(args.output, model=args.model, layer=args.layer,
                                                tokens=args.tokens, expansion=args.expansion, k=args.k))

    train = commands.add_parser("train", help="train transcoders on a model from a datasets corpus")
    train.add_argument("--model", required=True, help="Hugging Face name, local Hugging Face directory or .gguf file")
    train.add_argument("--dataset", required=True, help="Hugging Face dataset name, or local files / directory / glob")
    train.add_argument("--split", default="train")
    train.add_argument("--text-column", default="text")
    train.add_argument("--streaming", action="store_true", help="stream the dataset")
    train.add_argument("--device", default=None)
    add_config_options(train, TrainConfig)
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser("eval", help="splice transcoders in and print the CE report as JSON")
    evaluate.add_argument("--model", required=True, help="Hugging Face name, local Hugging Face directory or .gguf file")
    evaluate.add_argument("--transcoders", nargs="+", required=True, help="directories written by Transcoder.save")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", help="a torch.save'd [batch, pos] tensor of token ids")
    source.add_argument("--text", help="a text file to tokenize")
    evaluate.add_argument("--seq-len", type=int, default=128)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", default=None)
    evaluate.set_defaults(run=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
