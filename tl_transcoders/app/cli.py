"""The `tl-transcoders` command: `demo`, `train`, `eval` and `attribute`.

What the library refuses (a `TranscodersError`: a bad option, file, model name or token
set) is printed as one line, `tl-transcoders: error: ...`, with exit status 2; `--debug`
shows the traceback instead. Ctrl-C stops with status 130 (a training run keeps a
checkpoint of its progress).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

import torch

from tl_transcoders.app.demo import run_demo
from tl_transcoders.core.config import field_docs
from tl_transcoders.core.errors import TranscodersError
from tl_transcoders.core.files import check_writable_directory
from tl_transcoders.evaluation import evaluate_splice
from tl_transcoders.hooks.models import load_model
from tl_transcoders.hooks.tokens import TokenError, text_rows
from tl_transcoders.io.loading import load_pretrained
from tl_transcoders.training import TrainConfig, Trainer

__all__ = ["build_parser", "main", "parse_layers"]


def read_tokens(args: argparse.Namespace, model: torch.nn.Module) -> torch.Tensor:
    """The token rows from `--tokens` (a saved `[batch, pos]` tensor of token ids) or
    `--text` (a text file cut into rows of `--seq-len` tokens, each starting with BOS)."""
    if args.text:
        path = Path(args.text)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise TokenError(f"--text {path}: cannot read it as text ({err})") from err
        return text_rows(model, text, args.seq_len, where=f"--text {path}")
    try:
        tokens = torch.load(args.tokens, weights_only=True)
    except Exception as err:  # torch.load raises many kinds for a file that is not a tensor
        raise TokenError(
            f"--tokens {args.tokens}: not a file written by torch.save ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(tokens, torch.Tensor):
        raise TokenError(f"--tokens {args.tokens}: holds a {type(tokens).__name__}, not a tensor of token ids")
    return tokens


def cmd_eval(args: argparse.Namespace) -> None:
    model = load_model(args.model, device=args.device)
    transcoders = load_transcoders(args.transcoders, args.device)
    report = evaluate_splice(model, transcoders, read_tokens(args, model), batch_size=args.batch_size)
    json.dump(report.to_dict(), sys.stdout, indent=2)
    print()


def load_transcoders(paths: list[str], device: str | None) -> list:
    """The transcoders saved in `paths` (directories in any format read by
    `load_pretrained`, or Hub repos), one list."""
    transcoders = []
    for path in paths:
        loaded = load_pretrained(path, device=device)
        transcoders += loaded if isinstance(loaded, list) else [loaded]
    return transcoders


def read_target_token(text: str) -> int | str:
    """A token of `--logit` / `--logit-diff`: `#123` is an id, anything else the token's text."""
    if text.startswith("#") and text[1:].isdigit():
        return int(text[1:])
    return text


def cmd_attribute(args: argparse.Namespace) -> None:
    from tl_transcoders.attribution.attribute import attribute
    from tl_transcoders.attribution.export import check_slug, export_graph
    from tl_transcoders.attribution.prune import check_thresholds, graph_scores, prune
    from tl_transcoders.attribution.targets import LogitDifference, LogitTarget

    check_thresholds(args.node_threshold, args.edge_threshold)  # before the long part
    check_slug(args.slug)
    check_writable_directory(args.out)
    model = load_model(args.model, device=args.device)
    transcoders = load_transcoders(args.transcoders, args.device)
    if args.tokens:
        prompt = read_tokens(args, model)
    else:
        prompt = args.prompt
    targets = [LogitTarget(read_target_token(t)) for t in args.logit or []]
    targets += [LogitDifference(read_target_token(a), read_target_token(b)) for a, b in args.logit_diff or []]
    out = Path(args.out)
    graph = attribute(
        model,
        transcoders,
        prompt,
        max_feature_nodes=args.max_feature_nodes,
        memory_budget=None if args.memory_budget_mib is None else args.memory_budget_mib << 20,
        targets=targets or None,
    )
    tokenizer = getattr(model, "tokenizer", None)
    graph.save(out / "graph.safetensors")
    pruned = prune(graph, args.node_threshold, args.edge_threshold)
    pruned.graph.save(out / "pruned.safetensors")
    export_graph(
        graph,
        out / "graph-files",
        args.slug,
        tokenizer=tokenizer,
        node_threshold=args.node_threshold,
        edge_threshold=args.edge_threshold,
    )
    scores = graph_scores(graph)
    summary = {
        "features": graph.n_features,
        "active_features": graph.metadata["n_active_features"],
        "targets": graph.target_labels(tokenizer),
        "pruned_features": pruned.graph.n_features,
        "replacement_score": scores.replacement,
        "completeness_score": scores.completeness,
        "files": [str(out / name) for name in ("graph.safetensors", "pruned.safetensors", "graph-files")],
    }
    json.dump(summary, sys.stdout, indent=2)
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
    """One `--option` per dataclass field, typed from its annotation, its help the
    field's docstring."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = None if f.default is dataclasses.MISSING else f.default
        help_text = docs.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if f.name == "layers":
            parser.add_argument(flag, type=parse_layers, required=True, help=f"{help_text} Written 0-29 or 3,9,15.")
            continue
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        choices = None
        if typing.get_origin(kind) is not typing.Literal:  # X | None: the X
            kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        if typing.get_origin(kind) is typing.Literal:
            choices, kind = typing.get_args(kind), str
        parser.add_argument(flag, type=kind, default=default, choices=choices, help=f"{help_text} (default: {default})")


def cmd_train(args: argparse.Namespace) -> None:
    from tl_transcoders.io.data import load_text_dataset, token_batches

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    model = load_model(args.model, device=args.device)
    dataset = load_text_dataset(args.dataset, split=args.split, streaming=args.streaming)
    batches = token_batches(dataset, model.tokenizer, cfg.context_size, cfg.batch_size, text_column=args.text_column)
    transcoders = Trainer(model, cfg).fit(batches)
    for transcoder in transcoders:
        print(f"saved {Path(cfg.output_dir) / f'layer_{transcoder.cfg.layer}'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tl-transcoders", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="end-to-end run on an embedded default")
    demo.add_argument("--output", default="demo-output", help="output directory")
    demo.add_argument(
        "--model",
        choices=["smollm2", "tiny"],
        default="smollm2",
        help="SmolLM2-135M (extra [demo]) or a tiny random model",
    )
    demo.add_argument("--layer", type=int, default=None, help="layer to train (default: the middle one)")
    demo.add_argument("--tokens", type=int, default=400_000, help="training tokens")
    demo.add_argument("--expansion", type=int, default=8)
    demo.add_argument("--k", type=int, default=32)
    demo.set_defaults(
        run=lambda args: run_demo(
            args.output, model=args.model, layer=args.layer, tokens=args.tokens, expansion=args.expansion, k=args.k
        )
    )

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
    evaluate.add_argument(
        "--model", required=True, help="Hugging Face name, local Hugging Face directory or .gguf file"
    )
    evaluate.add_argument(
        "--transcoders",
        nargs="+",
        required=True,
        help="directories of saved transcoders (ours, sparsify, SAELens, circuit-tracer) or Hub repos",
    )
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", help="a torch.save'd [batch, pos] tensor of token ids")
    source.add_argument("--text", help="a text file to tokenize")
    evaluate.add_argument("--seq-len", type=int, default=128, help="tokens per row of --text")
    evaluate.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    evaluate.add_argument("--device", default=None)
    evaluate.set_defaults(run=cmd_eval)

    graph = commands.add_parser(
        "attribute", help="the attribution graph of a prompt: the graph, its pruned form and circuit-tracer's JSON"
    )
    graph.add_argument("--model", required=True, help="Hugging Face name, local Hugging Face directory or .gguf file")
    graph.add_argument(
        "--transcoders", nargs="+", required=True, help="directories of saved transcoders (any format) or Hub repos"
    )
    prompt = graph.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt's text (tokenized as the model does, with its BOS)")
    prompt.add_argument("--tokens", help="a torch.save'd tensor of the prompt's token ids, [n_pos] or [1, n_pos]")
    graph.add_argument(
        "--logit", action="append", metavar="TOKEN", help="a logit to explain (repeatable; #id or the token's text)"
    )
    graph.add_argument(
        "--logit-diff",
        action="append",
        nargs=2,
        metavar=("TOKEN", "OTHER"),
        help="explain logit(TOKEN) - logit(OTHER) (repeatable); without --logit / --logit-diff: the top logits",
    )
    graph.add_argument("--max-feature-nodes", type=int, default=None, help="features kept by influence (default: all)")
    graph.add_argument("--node-threshold", type=float, default=0.8, help="pruning: share of influence kept by nodes")
    graph.add_argument("--edge-threshold", type=float, default=0.98, help="pruning: share of influence kept by edges")
    graph.add_argument("--memory-budget-mib", type=int, default=None, help="peak memory allowed (default: most of it)")
    graph.add_argument("--slug", default="graph", help="the graph's name in circuit-tracer's files")
    graph.add_argument("--out", required=True, help="output directory")
    graph.add_argument("--device", default=None)
    graph.set_defaults(run=cmd_attribute, text=None)

    viewer = commands.add_parser("serve", help="a local viewer of the graphs that attribute wrote")
    viewer.add_argument("directory", help="the --out directory of `attribute` (or a folder of graph files)")
    viewer.add_argument("--port", type=int, default=8765, help="the port (0: any free port; default: 8765)")
    viewer.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    viewer.add_argument(
        "--dashboards", nargs="+", default=[], help="dashboards files (save_dashboards to a .json) shown on click"
    )
    viewer.add_argument("--labels", help='a JSON object of feature labels: {"LAYER/LATENT": "label", ...}')
    viewer.set_defaults(run=cmd_serve)
    return parser


def cmd_serve(args: argparse.Namespace) -> None:
    from tl_transcoders.app.serve import serve

    serve(args.directory, host=args.host, port=args.port, dashboards=args.dashboards, labels=args.labels)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except TranscodersError as err:
        if args.debug:
            raise
        message = " ".join(str(err).split())
        print(f"tl-transcoders: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("tl-transcoders: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
