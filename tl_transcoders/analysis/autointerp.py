"""Automated interpretability: LLM-written explanations of latents, scored by detection
and fuzzing (the method of EleutherAI's delphi, used by "Transcoders Beat Sparse
Autoencoders for Interpretability" to compare dictionaries).

For one latent:

1. `sample_contexts` picks contexts (token rows, or windows cut from them): the
   strongest activating contexts to explain, activating test contexts spread over
   activation quantiles, extra activating contexts (fuzzing negatives) and random
   contexts where the latent never fires (detection negatives).
2. An LLM reads the explanation contexts, with the active tokens marked `<<like this>>`,
   and writes a one-sentence explanation.
3. Detection: the LLM gets the explanation and unmarked contexts and answers, for each,
   whether the latent fires in it (activating test contexts vs non-activating ones).
   Fuzzing: the LLM gets the explanation and marked contexts and answers whether the
   marks are the tokens the explanation describes (test contexts marked where the
   latent is active vs extra contexts with as many tokens marked at random where it is
   not).
4. Each method's score is the balanced accuracy, (TPR + TNR) / 2, from its confusion
   counts. An unusable answer (malformed, a refusal, cut off, no JSON list of the
   right length) is asked for once more with a short corrective turn; one that still
   cannot be parsed counts as wrong, and both are counted.

`score_latents` runs all of this for many latents and `aggregate_scores` summarises
them (mean, standard error, failures by kind) for comparing dictionaries. A failing
latent (timeout, HTTP or connection error, its time budget spent) is recorded and the
run goes on. Everything works on plain tensors (`tokens` and one latent's
`activations`, both `[n_ctx, ctx_len]`), so any dictionary fits; `latent_activations`
computes them for a `Transcoder`.

The LLM is anything with `complete(messages, *, max_tokens, temperature) -> str`:
`OpenAICompatibleClient` talks to an OpenAI-style `/chat/completions` endpoint (OpenAI,
vLLM, llama.cpp server, `transformers serve`, ...); `FakeClient` is a deterministic
judge for tests. Failures raise `LLMError`, whose `kind` says what went wrong.
"""

from __future__ import annotations

import http.client
import inspect
import json
import math
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tl_transcoders.analysis.dashboards import (
    check_encodable,
    check_latents,
    token_strings,
    transcoder_inputs,
    visible,
)
from tl_transcoders.analysis.errors import AnalysisError
from tl_transcoders.core.errors import TranscodersError, check_at_least
from tl_transcoders.core.transcoder import Transcoder
from tl_transcoders.evaluation.statistics import mean_and_sem
from tl_transcoders.hooks.tokens import TokenInput, token_batches_of

__all__ = [
    "ClassifierScore",
    "Completion",
    "DETECTION_SYSTEM",
    "EXPLANATION_REASK",
    "EXPLANATION_SYSTEM",
    "Example",
    "FUZZING_SYSTEM",
    "FakeClient",
    "LABELS_REASK",
    "LLMClient",
    "LLMError",
    "LatentSamples",
    "LatentScore",
    "Messages",
    "OpenAICompatibleClient",
    "TokenDecoder",
    "aggregate_scores",
    "classification_prompt",
    "example_texts",
    "explain_and_score",
    "explanation_prompt",
    "latent_activations",
    "marked_spans",
    "parse_explanation",
    "parse_labels",
    "render",
    "sample_contexts",
    "score_latents",
]

Messages = list[dict[str, str]]
TokenDecoder = Any
"""A tokenizer (anything with `decode(list[int]) -> str`, each token decoded alone) or a
function from a list of token ids to the list of their strings."""


# --- activations ------------------------------------------------------------------


def latent_activations(
    model: nn.Module,
    transcoder: Transcoder,
    tokens: TokenInput,
    latents: Sequence[int] | Tensor,
    batch_size: int = 32,
) -> Float[Tensor, "n_latents n_ctx ctx_len"]:
    """The activations of `latents` of `transcoder` on every token of `tokens`, on the
    CPU in float32: the transcoder's input site is captured (`sites.capture`, one code
    path for HookedTransformer and TransformerBridge) and encoded, `batch_size` rows
    at a time."""
    check_at_least(AnalysisError, 1, batch_size=batch_size)
    check_encodable(model, transcoder)
    chosen = check_latents(transcoder, latents)
    out = []
    with torch.no_grad():
        for batch in token_batches_of(model, tokens, batch_size, min_positions=1):
            acts = transcoder.encode(transcoder_inputs(model, batch, transcoder))[:, chosen].float().cpu()
            out.append(acts.T.reshape(len(chosen), *batch.shape))
    return torch.cat(out, dim=1)


# --- sampling ---------------------------------------------------------------------


@dataclass
class Example:
    """One context: its token ids, the latent's activation on each, where it starts in
    the token set (`row`, `start`) and, for a test context, its activation quantile
    (0 = the strongest contexts)."""

    tokens: list[int]
    activations: list[float]
    row: int
    start: int
    quantile: int | None = None

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)


@dataclass
class LatentSamples:
    """The contexts `sample_contexts` chose for one latent.

    `train`: contexts the explanation is written from; `test`: activating contexts to
    score (positives of both methods); `extra`: other activating contexts, shown with
    random marks (fuzzing negatives); `non_activating`: contexts where the latent never
    fires (detection negatives). `notes` says why a list is short or empty; a latent
    without `train` or `test` contexts is not scored."""

    train: list[Example]
    test: list[Example]
    extra: list[Example]
    non_activating: list[Example]
    n_contexts: int
    n_active: int
    max_activation: float
    notes: list[str] = field(default_factory=list)


def sample_contexts(
    tokens: Int[Tensor, "n_rows row_len"],
    activations: Float[Tensor, "n_rows_acts row_len_acts"],
    n_train: int = 20,
    n_test_per_quantile: int = 4,
    n_quantiles: int = 5,
    n_random: int = 20,
    seed: int = 0,
    window: int | None = None,
    skip_bos: bool = True,
) -> LatentSamples:
    """Choose the contexts for one latent from `tokens` and its `activations` (same shape).

    The rule, exactly:

    1. Contexts are the rows, or with `window` the non-overlapping windows of `window`
       tokens cut from each row from its start (a shorter tail is dropped). With
       `skip_bos` the activation at position 0 of every row counts as 0.
    2. A context is active when its largest activation is > 0. Active contexts are
       ranked by their largest activation, decreasing (ties: earlier context first).
    3. `train` is the first min(`n_train`, max(1, A // 2)) of the ranking, A the number
       of active contexts: at most half of them when they are few, so that the rest
       can be scored.
    4. The rest of the ranking, N contexts, is cut into `n_quantiles` contiguous bins:
       bin q holds ranks floor(q N / Q) to floor((q + 1) N / Q) - 1 (bin 0 strongest).
       Each bin is shuffled (a `torch.Generator` seeded with `seed`, bins in order);
       its first t = min(`n_test_per_quantile`, ceil(size / 2)) contexts go to `test`
       (with quantile q), the next up to `n_test_per_quantile` to `extra`.
    5. `non_activating` is `n_random` contexts drawn uniformly without replacement (the
       same generator, after the bins) from the contexts that are not active.

    A latent that never fires gets empty `train`, `test` and `extra`; one that fires in
    few contexts gets short lists; one that fires everywhere gets no `non_activating`.
    `notes` says so in each case."""
    if tokens.shape != activations.shape:
        raise AnalysisError(
            f"tokens {tuple(tokens.shape)} and activations {tuple(activations.shape)} "
            "must have the same [n_ctx, ctx_len] shape"
        )
    check_at_least(AnalysisError, 0, n_train=n_train, n_test_per_quantile=n_test_per_quantile)
    check_at_least(AnalysisError, 1, n_quantiles=n_quantiles)
    check_at_least(AnalysisError, 0, n_random=n_random)
    acts = activations.detach().float().cpu().clone()
    toks = tokens.detach().cpu().long()
    if skip_bos and acts.shape[1]:
        acts[:, 0] = 0.0
    width = acts.shape[1] if window is None else window
    if not 1 <= width <= acts.shape[1]:
        raise AnalysisError(f"window must be between 1 and the row length {acts.shape[1]}, got {window}")
    n_per_row = acts.shape[1] // width
    acts = acts[:, : n_per_row * width].reshape(-1, width)
    toks = toks[:, : n_per_row * width].reshape(-1, width)

    def example(index: int, quantile: int | None = None) -> Example:
        return Example(
            toks[index].tolist(), acts[index].tolist(), index // n_per_row, (index % n_per_row) * width, quantile
        )

    peak = acts.max(dim=1).values
    active = (peak > 0).nonzero()[:, 0]
    ranking = active[torch.sort(-peak[active], stable=True).indices].tolist()
    notes = []
    n_explain = min(n_train, max(1, len(ranking) // 2))
    if not ranking:
        notes.append(f"the latent never fires in these {len(peak)} contexts: nothing to explain")
    elif n_explain < n_train:
        notes.append(
            f"the latent fires in only {len(ranking)} of {len(peak)} contexts: {n_explain} "
            f"explain it (n_train={n_train}), the rest are scored"
        )
    train = [example(i) for i in ranking[:n_explain]]
    rest = ranking[n_explain:]
    generator = torch.Generator().manual_seed(seed)
    test, extra = [], []
    for q in range(n_quantiles):
        bin_ = rest[q * len(rest) // n_quantiles : (q + 1) * len(rest) // n_quantiles]
        shuffled = [bin_[i] for i in torch.randperm(len(bin_), generator=generator).tolist()]
        t = min(n_test_per_quantile, math.ceil(len(bin_) / 2))
        test += [example(i, q) for i in shuffled[:t]]
        extra += [example(i, q) for i in shuffled[t : t + n_test_per_quantile]]
    if rest and len(test) < n_test_per_quantile * n_quantiles:
        notes.append(
            f"only {len(rest)} activating contexts left after the explanation examples: "
            f"{len(test)} test and {len(extra)} extra contexts instead of "
            f"{n_test_per_quantile * n_quantiles} each"
        )
    inactive = (peak <= 0).nonzero()[:, 0]
    if len(inactive) == 0 and n_random:
        notes.append("the latent fires in every context: no non-activating contexts for detection")
    picked = torch.randperm(len(inactive), generator=generator)[:n_random]
    non_activating = [example(int(inactive[i])) for i in picked.tolist()]
    return LatentSamples(
        train, test, extra, non_activating, len(peak), len(ranking), float(peak.max()) if len(peak) else 0.0, notes
    )


# --- LLM clients ------------------------------------------------------------------


class LLMError(TranscodersError, RuntimeError):
    """A request to the LLM failed. `kind` says how, for counting failures: "timeout",
    "connection" (refused, reset), "http" (an error status), "malformed" (a reply that
    is not a usable chat completion), "budget" (the latent's time budget ran out),
    "client" (the client raised another exception) or "other"."""

    def __init__(self, message: str, kind: str = "other"):
        super().__init__(message)
        self.kind = kind


class Completion(str):
    """A completion's text, with the server's `finish_reason` ("stop", "length", ...;
    None when it gave none)."""

    finish_reason: str | None

    def __new__(cls, text: str, finish_reason: str | None = None):
        self = super().__new__(cls, text)
        self.finish_reason = finish_reason
        return self


@runtime_checkable
class LLMClient(Protocol):
    """What the pipeline needs from an LLM: one chat completion as text (a `Completion`
    tells it a cut-off answer apart)."""

    def complete(self, messages: Messages, *, max_tokens: int, temperature: float) -> str: ...


class OpenAICompatibleClient:
    """Chat completions from an OpenAI-compatible server: POST `{base_url}/chat/completions`
    (e.g. `https://api.openai.com/v1`, or `http://localhost:8000/v1` for vLLM, the
    llama.cpp server and `transformers serve`). HTTP 429 and 5xx answers, refused
    connections and timeouts are retried `retries` times, waiting
    `retry_wait * 2**attempt` seconds; other failures raise `LLMError` at once (its
    `kind` says which). `extra_body` is merged into every request body."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 2,
        retry_wait: float = 1.0,
        extra_body: dict[str, Any] | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise AnalysisError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.retries, self.retry_wait = retries, retry_wait
        self.extra_body = dict(extra_body or {})

    def complete(self, messages: Messages, *, max_tokens: int = 256, temperature: float = 0.0) -> Completion:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
            **self.extra_body,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as err:
                detail = err.read()[:500].decode(errors="replace")
                if last or not (err.code == 429 or err.code >= 500):
                    raise LLMError(f"HTTP {err.code} from {self.url}: {detail}", "http") from err
            except (OSError, http.client.HTTPException) as err:  # URLError, timeouts, resets
                if last:
                    reason = err.reason if isinstance(err, urllib.error.URLError) else err
                    if isinstance(reason, TimeoutError):
                        raise LLMError(f"request to {self.url} timed out after {self.timeout} s", "timeout") from err
                    raise LLMError(f"request to {self.url} failed: {reason!r}", "connection") from err
            time.sleep(self.retry_wait * 2**attempt)
        return self._completion(raw)

    def _completion(self, raw: bytes) -> Completion:
        """The first choice of a chat completion body. Its `content` may be a string, null
        (then the message's `refusal`, if any) or a list of text parts. A body that is
        not JSON, an error object sent with HTTP 200, or anything else raises `LLMError`
        of kind "malformed"."""
        shown = raw[:300].decode(errors="replace")
        try:
            body = json.loads(raw)
        except ValueError:
            raise LLMError(
                f"{self.url} answered something that is not a chat completion (not JSON): {shown!r}", "malformed"
            ) from None
        if isinstance(body, dict) and "choices" not in body and ("error" in body or "detail" in body):
            raise LLMError(f"{self.url} answered an error with HTTP 200, not a chat completion: {shown}", "malformed")
        try:
            choice = body["choices"][0]
            message = choice["message"]
            return Completion(
                _content_text(message.get("content") or message.get("refusal")), choice.get("finish_reason")
            )
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise LLMError(
                f"{self.url} answered something that is not a chat completion: {shown!r}", "malformed"
            ) from err


def _content_text(content: str | list | None) -> str:
    """The text of a message's `content`: a string, None (no text) or a list of parts,
    strings or `{"type": "text", "text": ...}`, joined. Raises TypeError otherwise."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(part if isinstance(part, str) else str(part.get("text") or "") for part in content)
    raise TypeError(f"content is a {type(content).__name__}")


class FakeClient:
    """A deterministic stand-in for an LLM, for tests and dry runs.

    Explanation prompts get `explanation`. For detection and fuzzing prompts it answers
    each example with `judge(kind, text)` (kind "detection" or "fuzzing", `text` the
    example of the prompt's first user turn as shown, marks included), flipped with
    probability `noise` (a `random.Random(seed)`). Every prompt is kept in `calls`."""

    def __init__(self, explanation: str, judge: Callable[[str, str], bool], noise: float = 0.0, seed: int = 0):
        self.explanation, self.judge, self.noise = explanation, judge, noise
        self.rng = random.Random(seed)
        self.calls: list[Messages] = []

    def complete(self, messages: Messages, *, max_tokens: int = 256, temperature: float = 0.0) -> str:
        self.calls.append(messages)
        kind = _KIND_OF_SYSTEM_PROMPT.get(messages[0]["content"])
        if kind is None:
            raise LLMError("FakeClient only answers the prompts of tl_transcoders.analysis.autointerp")
        if kind == "explanation":
            return f"Explanation: {self.explanation}"
        answers = []
        for text in example_texts(messages[1]["content"]):
            answer = bool(self.judge(kind, text))
            answers.append(int(answer != (self.rng.random() < self.noise)))
        return json.dumps(answers)


# --- prompts and parsing ----------------------------------------------------------

EXPLANATION_SYSTEM = (
    "You are studying one latent feature of a language model. You will see text excerpts in "
    "which the feature is active; the tokens where it is active are marked with << and >>. "
    "Work out what the marked tokens, and the text around them, have in common. Finish "
    "with one line of the form\nExplanation: <a short description of the pattern>"
)
DETECTION_SYSTEM = (
    "You will be given a description of a feature of text and numbered text excerpts. For "
    "each excerpt decide whether the feature is present in it (1) or not (0). Reply with a "
    "JSON list holding one integer per excerpt, in order, for example [1, 0, 1], and nothing else."
)
FUZZING_SYSTEM = (
    "You will be given a description of a feature of text and numbered text excerpts in which "
    "some tokens are marked with << and >>. For each excerpt decide whether the marked tokens "
    "are the ones the description refers to (1) or whether they are marked wrongly (0). Reply "
    "with a JSON list holding one integer per excerpt, in order, for example [1, 0, 1], and "
    "nothing else."
)
_KIND_OF_SYSTEM_PROMPT = {EXPLANATION_SYSTEM: "explanation", DETECTION_SYSTEM: "detection", FUZZING_SYSTEM: "fuzzing"}
_EXAMPLE_LINE = re.compile(r"^Example (\d+): (.*)$", re.MULTILINE)
EXPLANATION_REASK = "Reply with only one line of the form\nExplanation: <a short description of the pattern>"
LABELS_REASK = "Reply with only a JSON list of {n} integers (0 or 1)."
"""The corrective follow-up turns sent once after an unusable explanation or label answer."""
_LIST = re.compile(r"\[[^\[\]]*\]")
_EXPLANATION_LINE = re.compile(r"explanation\s*:\s*(.+)", re.IGNORECASE)
_REFUSAL = re.compile(
    r"^\W*(sorry|as an ai|i\s*(am|'m|’m)\s*(sorry|unable|not able)"
    r"|i\s*(cannot|can\s*not|can't|can’t|won't|won’t|will not))\b",
    re.IGNORECASE,
)


def render(strings: Sequence[str], marked: Sequence[bool]) -> str:
    """The tokens as one line of text (whitespace made visible, see `dashboards.visible`),
    each run of consecutive marked tokens wrapped in `<<` and `>>`. Angle brackets in the
    text become `‹` and `›`, so that marks are never ambiguous."""
    out, inside = [], False
    for text, mark in zip(strings, marked):
        if mark != inside:
            out.append("<<" if mark else ">>")
            inside = mark
        out.append(_shown(text))
    return "".join(out) + (">>" if inside else "")


def _shown(text: str) -> str:
    return visible(text).replace("<", "‹").replace(">", "›")


def marked_spans(text: str) -> list[str]:
    """The marked parts of a rendered example."""
    return re.findall(r"<<(.*?)>>", text)


def example_texts(prompt: str) -> list[str]:
    """The examples of a detection or fuzzing prompt, in order."""
    return [match.group(2) for match in _EXAMPLE_LINE.finditer(prompt)]


def explanation_prompt(
    strings: Sequence[Sequence[str]], activations: Sequence[Sequence[float]], show_activations: bool = True
) -> Messages:
    """The prompt asking for an explanation: one line per context with its active tokens
    marked, followed (with `show_activations`) by each active token's strength on a
    1-10 scale relative to the strongest activation shown."""
    top = max((max(a, default=0.0) for a in activations), default=0.0)
    lines = []
    for i, (toks, acts) in enumerate(zip(strings, activations), start=1):
        lines.append(f"Example {i}: {render(toks, [a > 0 for a in acts])}")
        if show_activations and top > 0:
            strengths = [f"{_shown(t)!r}: {max(1, math.ceil(10 * a / top))}" for t, a in zip(toks, acts) if a > 0]
            lines.append(f"Activations {i}: " + ", ".join(strengths))
    return [{"role": "system", "content": EXPLANATION_SYSTEM}, {"role": "user", "content": "\n".join(lines)}]


def classification_prompt(kind: str, explanation: str, texts: Sequence[str]) -> Messages:
    """The detection or fuzzing prompt (`kind`) for a batch of rendered examples."""
    system = {"detection": DETECTION_SYSTEM, "fuzzing": FUZZING_SYSTEM}[kind]
    examples = "\n".join(f"Example {i}: {text}" for i, text in enumerate(texts, start=1))
    user = (
        f"Feature description: {explanation}\n\nExcerpts:\n{examples}\n\n"
        f"Reply with a JSON list of {len(texts)} integers (1 or 0)."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_explanation(answer: str) -> str | None:
    """The text after the last `Explanation:` of an answer, else its last non-empty line;
    None for an empty answer."""
    found = _EXPLANATION_LINE.findall(answer)
    lines = [line.strip() for line in answer.splitlines() if line.strip()]
    text = found[-1].strip() if found else (lines[-1] if lines else "")
    return text.strip(" \"'*") or None


def parse_labels(answer: str, n: int) -> list[int] | None:
    """The last JSON list in `answer` of exactly `n` entries that are all 0 or 1 (or
    booleans), as ints; None if there is none. Surrounding text is ignored."""
    for candidate in reversed(_LIST.findall(answer)):
        try:
            values = json.loads(candidate)
        except ValueError:
            continue
        if len(values) == n and all(v in (0, 1) and not isinstance(v, float) for v in values):
            return [int(v) for v in values]
    return None


def _explanation_of(answer: str) -> str | None:
    """`parse_explanation` of an answer, or None when it is a refusal or was cut off at
    `max_tokens` before its `Explanation:` line."""
    cut_off = getattr(answer, "finish_reason", None) == "length"
    if _REFUSAL.match(answer) or (cut_off and not _EXPLANATION_LINE.search(answer)):
        return None
    return parse_explanation(answer)


def _unusable(answer: str) -> str:
    """Why an answer that did not parse is of no use, for notes and errors."""
    text = answer.strip()
    if getattr(answer, "finish_reason", None) == "length":
        return f"cut off at max_tokens (finish_reason 'length'): {text[:80]!r}"
    if not text:
        return "an empty answer"
    return f"{'a refusal' if _REFUSAL.match(text) else 'nothing parsable'}: {text[:80]!r}"


def _follow_up(messages: Messages, answer: str, instruction: str) -> Messages:
    """`messages` continued by the unusable `answer` and the corrective user turn
    `instruction`; without an answer to show, `instruction` is added to the last user
    turn instead (chat templates want user and assistant turns to alternate)."""
    if answer.strip():
        return [*messages, {"role": "assistant", "content": str(answer)}, {"role": "user", "content": instruction}]
    return [*messages[:-1], {**messages[-1], "content": f"{messages[-1]['content']}\n\n{instruction}"}]


# --- scoring ----------------------------------------------------------------------


@dataclass
class ClassifierScore:
    """Confusion counts of one scoring method for one latent. Samples whose answer could
    not be parsed count as wrong (in `fn` or `fp`) and also in `n_unparsed`; their
    batches in `n_failed_batches`. `n_retried` batches were asked again after an
    unusable first answer. `per_quantile[q] = [correct, total]` over the activating
    samples of quantile q."""

    tp: int = 0
    fn: int = 0
    tn: int = 0
    fp: int = 0
    n_unparsed: int = 0
    n_batches: int = 0
    n_failed_batches: int = 0
    n_retried: int = 0
    per_quantile: dict[int, list[int]] = field(default_factory=dict)

    @property
    def tpr(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def tnr(self) -> float:
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else math.nan

    @property
    def balanced_accuracy(self) -> float:
        """(TPR + TNR) / 2; NaN when either class has no samples."""
        return (self.tpr + self.tnr) / 2

    def add(self, truth: bool, prediction: int | None, quantile: int | None) -> None:
        correct = prediction is not None and bool(prediction) == truth
        self.n_unparsed += prediction is None
        if truth:
            self.tp += correct
            self.fn += not correct
            if quantile is not None:
                counts = self.per_quantile.setdefault(quantile, [0, 0])
                counts[0] += correct
                counts[1] += 1
        else:
            self.tn += correct
            self.fp += not correct

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "per_quantile": {str(q): c for q, c in sorted(self.per_quantile.items())},
            "tpr": self.tpr,
            "tnr": self.tnr,
            "balanced_accuracy": self.balanced_accuracy,
        }


@dataclass
class LatentScore:
    """The explanation of one latent and its detection and fuzzing scores. A latent that
    could not be scored has `explanation` None and a reason in `notes` (skipped: too
    few contexts) or `error` (the LLM failed), with the kind of failure in `failure`
    (an `LLMError` kind: "timeout", "http", "connection", "malformed", "budget", ...).
    `explanation_retried`: the explanation was asked for again after an unusable
    first answer."""

    latent: int | None
    explanation: str | None
    detection: ClassifierScore
    fuzzing: ClassifierScore
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    failure: str | None = None
    explanation_retried: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "latent": self.latent,
            "explanation": self.explanation,
            "detection": self.detection.to_dict(),
            "fuzzing": self.fuzzing.to_dict(),
            "notes": list(self.notes),
            "error": self.error,
            "failure": self.failure,
            "explanation_retried": self.explanation_retried,
        }


@dataclass
class _Sample:
    text: str
    truth: bool
    quantile: int | None


def _decoder(decode: TokenDecoder) -> Callable[[list[int]], list[str]]:
    if hasattr(decode, "decode"):
        return lambda ids: token_strings(decode, ids)
    if callable(decode):
        return lambda ids: [str(s) for s in decode(ids)]
    raise AnalysisError(
        f"decode must be a tokenizer or a function from token ids to strings, got {type(decode).__name__}"
    )


class _Asker:
    """Sends one latent's prompts to `client`: its answer as text, any exception of its
    `complete` wrapped into an `LLMError` (kind "client"), all within `latent_timeout`
    seconds from now (None: no limit). A request still running when the time is up is
    left to finish in a daemon thread; its answer is not used."""

    def __init__(self, client: LLMClient, max_tokens: int, temperature: float, latent_timeout: float | None):
        self.client, self.max_tokens, self.temperature = client, max_tokens, temperature
        self.latent_timeout = latent_timeout
        self.deadline = None if latent_timeout is None else time.monotonic() + latent_timeout

    def __call__(self, messages: Messages) -> str:
        if self.deadline is None:
            return self._complete(messages)
        left = self.deadline - time.monotonic()
        if left > 0:
            future: Future[str] = Future()
            threading.Thread(target=self._complete_into, args=(future, messages), daemon=True).start()
            try:
                return future.result(timeout=left)
            except FutureTimeout:
                pass
        raise LLMError(f"the latent's time budget (latent_timeout={self.latent_timeout} s) ran out", "budget")

    def reply(self, messages: Messages) -> tuple[str, str | None]:
        """The answer and None, or "" and what was wrong when the reply was malformed
        (an `LLMError` of kind "malformed"); other failures raise."""
        try:
            return self(messages), None
        except LLMError as err:
            if err.kind != "malformed":
                raise
            return "", str(err)

    def _complete(self, messages: Messages) -> str:
        try:
            answer = self.client.complete(messages, max_tokens=self.max_tokens, temperature=self.temperature)
        except LLMError:
            raise
        except Exception as err:
            raise LLMError(f"the client raised {type(err).__name__}: {err}", "client") from err
        if not isinstance(answer, str):
            raise LLMError(f"the client returned a {type(answer).__name__}, not text", "malformed")
        return answer

    def _complete_into(self, future: Future, messages: Messages) -> None:
        try:
            future.set_result(self._complete(messages))
        except BaseException as err:  # handed to the waiting thread
            future.set_exception(err)


def _ask_parsed(
    ask: _Asker, messages: Messages, parse: Callable[[str], Any], instruction: str, reask: bool
) -> tuple[Any, list[str]]:
    """`parse` of the answer to `messages`; when the reply is malformed or `parse` finds
    nothing (None), asked once more with the corrective follow-up turn `instruction`
    if `reask`. Returns the parsed value (None if no answer parsed) and why each
    unusable answer was of no use (empty when the first answer parsed)."""
    problems = []
    for _ in range(1 + reask):
        answer, problem = ask.reply(messages)
        value = None if problem else parse(answer)
        if value is not None:
            break
        problems.append(problem or _unusable(answer))
        messages = _follow_up(messages, answer, instruction)
    return value, problems


def explain_and_score(
    client: LLMClient,
    decode: TokenDecoder,
    samples: LatentSamples,
    latent: int | None = None,
    batch_size: int = 5,
    show_activations: bool = True,
    fuzz_threshold: float = 0.3,
    seed: int = 0,
    temperature: float = 0.0,
    max_tokens: int = 512,
    reask: bool = True,
    latent_timeout: float | None = None,
) -> LatentScore:
    """Explain one latent from `samples.train` and score the explanation by detection and
    fuzzing, `batch_size` examples per prompt, in an order shuffled with `seed`.

    Fuzzing marks, in a test context, the tokens whose activation is at least
    `fuzz_threshold` times that context's largest; in an extra context it marks as many
    tokens (the mean count over the test contexts, rounded up) drawn at random from
    those below the threshold.

    An unusable answer (a malformed reply, a refusal, one cut off at `max_tokens`, no
    explanation or no label list of the right length in it) is asked for once more
    with a short corrective follow-up turn when `reask`: re-asked batches are counted
    in `n_retried`, a re-asked explanation in `explanation_retried` and `notes`. With
    no usable explanation the latent gets an `error` and `failure` "malformed".
    `latent_timeout` bounds the seconds all of the latent's requests may take together
    (None: no bound). Raises `LLMError` if the client fails (kind "budget" when
    `latent_timeout` ran out; any other exception of the client is wrapped into one)."""
    check_at_least(AnalysisError, 1, batch_size=batch_size)
    if not 0 < fuzz_threshold <= 1:
        raise AnalysisError(f"fuzz_threshold must be in (0, 1], got {fuzz_threshold}")
    if latent_timeout is not None and not latent_timeout > 0:
        raise AnalysisError(f"latent_timeout must be positive seconds or None, got {latent_timeout}")
    strings = _decoder(decode)
    notes = list(samples.notes)
    score = LatentScore(latent, None, ClassifierScore(), ClassifierScore(), notes)
    if not samples.train or not samples.test:
        notes.append(f"not scored: no activating contexts {'to explain' if not samples.train else 'left to test'}")
        return score
    ask = _Asker(client, max_tokens, temperature, latent_timeout)
    prompt = explanation_prompt(
        [strings(e.tokens) for e in samples.train], [e.activations for e in samples.train], show_activations
    )
    explanation, problems = _ask_parsed(ask, prompt, _explanation_of, EXPLANATION_REASK, reask)
    score.explanation_retried = reask and bool(problems)
    if explanation is None:
        score.error, score.failure = f"no usable explanation: {'; after the re-ask, '.join(problems)}", "malformed"
        return score
    if problems:
        notes.append(f"explanation re-asked: the first answer was {problems[0]}")
    score.explanation = explanation
    rng = random.Random(seed)
    detection = [
        _Sample(render(strings(e.tokens), [False] * len(e.tokens)), truth, e.quantile)
        for group, truth in ((samples.test, True), (samples.non_activating, False))
        for e in group
    ]
    fuzzing = _fuzzing_samples(samples, strings, fuzz_threshold, rng, notes)
    for kind, group, result in (("detection", detection, score.detection), ("fuzzing", fuzzing, score.fuzzing)):
        if not any(s.truth for s in group) or all(s.truth for s in group):
            notes.append(f"{kind}: needs both activating and non-activating samples; balanced accuracy is NaN")
        rng.shuffle(group)
        problems = _classify(ask, kind, explanation, group, result, batch_size, reask)
        if problems:
            notes.append(
                f"{kind}: {result.n_retried} of {result.n_batches} batches re-asked, "
                f"{result.n_failed_batches} still unparsed; the last unusable answer was {problems[-1]}"
            )
    return score


def _classify(
    ask: _Asker,
    kind: str,
    explanation: str,
    group: list[_Sample],
    result: ClassifierScore,
    batch_size: int,
    reask: bool,
) -> list[str]:
    """Ask the detection or fuzzing (`kind`) question about `group`, `batch_size` samples
    per prompt, and count the answers in `result`. Returns why each unusable answer was
    of no use."""
    every_problem = []
    for start in range(0, len(group), batch_size):
        batch = group[start : start + batch_size]
        labels, problems = _ask_parsed(
            ask,
            classification_prompt(kind, explanation, [s.text for s in batch]),
            partial(parse_labels, n=len(batch)),
            LABELS_REASK.format(n=len(batch)),
            reask,
        )
        every_problem += problems
        result.n_batches += 1
        result.n_retried += reask and bool(problems)
        result.n_failed_batches += labels is None
        for i, sample in enumerate(batch):
            result.add(sample.truth, None if labels is None else labels[i], sample.quantile)
    return every_problem


def _fuzzing_samples(
    samples: LatentSamples,
    strings: Callable[[list[int]], list[str]],
    threshold: float,
    rng: random.Random,
    notes: list[str],
) -> list[_Sample]:
    correct = []
    for e in samples.test:
        cut = threshold * e.max_activation
        correct.append(_Sample(render(strings(e.tokens), [a >= cut for a in e.activations]), True, e.quantile))
    if not samples.test:
        return correct
    n_marks = math.ceil(
        sum(sum(a >= threshold * e.max_activation for a in e.activations) for e in samples.test) / len(samples.test)
    )
    wrong, dropped = [], 0
    for e in samples.extra:
        cut = threshold * e.max_activation
        candidates = [i for i, a in enumerate(e.activations) if a < cut]
        if not candidates:
            dropped += 1
            continue
        chosen = set(rng.sample(candidates, min(n_marks, len(candidates))))
        wrong.append(_Sample(render(strings(e.tokens), [i in chosen for i in range(len(e.tokens))]), False, None))
    if dropped:
        notes.append(f"fuzzing: {dropped} extra contexts have no token below the threshold to mark")
    return correct + wrong


def score_latents(
    client: LLMClient,
    decode: TokenDecoder,
    tokens: Int[Tensor, "n_rows row_len"],
    activations: Float[Tensor, "n_latents n_rows_acts row_len_acts"],
    latents: Sequence[int] | None = None,
    seed: int = 0,
    raise_errors: bool = False,
    **options: Any,
) -> list[LatentScore]:
    """`sample_contexts` and `explain_and_score` for each latent: `activations[i]` belongs
    to latent `latents[i]` (default: i); `seed` seeds both. `options` are theirs, each
    given to the one that takes it: `sample_contexts`'s `n_train`,
    `n_test_per_quantile`, `n_quantiles`, `n_random`, `window`, `skip_bos`;
    `explain_and_score`'s `batch_size`, `show_activations`, `fuzz_threshold`,
    `temperature`, `max_tokens`, `reask`, `latent_timeout`. An `LLMError` on one latent
    (a timeout, an HTTP or connection failure, its `latent_timeout` seconds spent, any
    exception of the client) is recorded in its `error` and `failure` and the next
    latent goes on, unless `raise_errors`."""
    given = {"tokens", "activations", "client", "decode", "samples", "latent", "seed"}  # set here, not options
    sampling_names = set(inspect.signature(sample_contexts).parameters) - given
    scoring_names = set(inspect.signature(explain_and_score).parameters) - given
    unknown = sorted(set(options) - sampling_names - scoring_names)
    if unknown:
        raise AnalysisError(
            f"score_latents: unknown options {unknown}; it takes {sorted(sampling_names | scoring_names)}"
        )
    sampling = {name: value for name, value in options.items() if name in sampling_names}
    scoring = {name: value for name, value in options.items() if name in scoring_names}
    latents = list(range(activations.shape[0])) if latents is None else list(latents)
    if len(latents) != activations.shape[0]:
        raise AnalysisError(f"{len(latents)} latent ids for {activations.shape[0]} activation tensors")
    scores = []
    for i, latent in enumerate(latents):
        samples = sample_contexts(tokens, activations[i], seed=seed, **sampling)
        try:
            scores.append(explain_and_score(client, decode, samples, latent, seed=seed, **scoring))
        except LLMError as err:
            if raise_errors:
                raise
            scores.append(
                LatentScore(latent, None, ClassifierScore(), ClassifierScore(), list(samples.notes), str(err), err.kind)
            )
    return scores


def aggregate_scores(scores: Sequence[LatentScore]) -> dict[str, Any]:
    """Summary over latents, for comparing dictionaries: for detection and fuzzing the
    mean balanced accuracy, its standard error (sample std / sqrt(n); NaN for n < 2)
    and n over the latents with a finite score; how many latents were skipped (too few
    contexts), failed (LLM error or no usable explanation), and how many failed by
    `failure` kind; the re-asked explanations; the unparsed answers and re-asked
    batches."""
    summary: dict[str, Any] = {
        "n_latents": len(scores),
        "n_skipped": sum(s.explanation is None and s.error is None for s in scores),
        "n_failed": sum(s.error is not None for s in scores),
        "failures": dict(Counter(s.failure or "other" for s in scores if s.error is not None)),
        "n_explanations_retried": sum(s.explanation_retried for s in scores),
    }
    for kind in ("detection", "fuzzing"):
        results = [getattr(s, kind) for s in scores]
        values = [r.balanced_accuracy for r in results if not math.isnan(r.balanced_accuracy)]
        mean, sem = mean_and_sem(values)
        summary[kind] = {
            "mean": mean,
            "sem": sem,
            "n": len(values),
            "n_unparsed": sum(r.n_unparsed for r in results),
            "n_failed_batches": sum(r.n_failed_batches for r in results),
            "n_retried": sum(r.n_retried for r in results),
        }
    return summary
