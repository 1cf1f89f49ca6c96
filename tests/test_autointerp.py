"""autointerp: context sampling, prompts and parsing, detection/fuzzing scores with fake
judges of known accuracy, the HTTP client and the pipeline's robustness against a local
fake endpoint that answers with each kind of fault, and latent activations against a
hand-captured encode."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import make_transcoder

from tl_transcoders.analysis.autointerp import (
    Completion,
    FakeClient,
    LLMError,
    OpenAICompatibleClient,
    aggregate_scores,
    classification_prompt,
    example_texts,
    explain_and_score,
    explanation_prompt,
    latent_activations,
    marked_spans,
    parse_explanation,
    parse_labels,
    render,
    sample_contexts,
    score_latents,
)
from tl_transcoders.analysis.errors import AnalysisError

TARGET = 7


def decode(ids):
    """A fake tokenizer: token i reads " w{i}"."""
    return [f" w{i}" for i in ids]


def synthetic_latent(n_rows: int = 80, n_active: int = 50, row_len: int = 16, seed: int = 0):
    """Random tokens without TARGET, then TARGET put at 1-3 random positions (never 0)
    of the first `n_active` rows; the latent fires exactly on TARGET, at 0.5-1.0 times a
    per-row scale, so every active token is above the fuzzing threshold."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 19, (n_rows, row_len), generator=g)
    tokens[tokens >= TARGET] += 1
    for row in range(n_active):
        where = torch.randperm(row_len - 1, generator=g)[: int(torch.randint(1, 4, (1,), generator=g))] + 1
        tokens[row, where] = TARGET
    scale = torch.rand(n_rows, 1, generator=g) * 5 + 0.1
    acts = (tokens == TARGET) * scale * (0.5 + 0.5 * torch.rand(n_rows, row_len, generator=g))
    return tokens, acts.float()


def words(text: str) -> list[str]:
    return text.replace("<<", " ").replace(">>", " ").split()


def perfect_judge(kind: str, text: str) -> bool:
    """Knows the rule "fires on w7": detection = w7 occurs; fuzzing = every marked token
    is w7."""
    if kind == "detection":
        return f"w{TARGET}" in words(text)
    spans = marked_spans(text)
    return bool(spans) and all(w == f"w{TARGET}" for span in spans for w in span.split())


# --- sampling ---------------------------------------------------------------------


def test_sampler_follows_the_quantile_rule():
    g = torch.Generator().manual_seed(1)
    n_rows, n_train, q, per = 60, 5, 4, 3
    peaks = torch.randperm(n_rows, generator=g).float() + 1
    peaks[torch.arange(n_rows) % 4 == 3] = 0  # 15 inactive rows
    acts = torch.zeros(n_rows, 8)
    acts[torch.arange(n_rows), torch.randint(1, 8, (n_rows,), generator=g)] = peaks
    tokens = torch.randint(0, 50, (n_rows, 8), generator=g)
    s = sample_contexts(tokens, acts, n_train=n_train, n_test_per_quantile=per, n_quantiles=q, n_random=10, seed=3)

    # the rule, written out independently
    active = [i for i in range(n_rows) if peaks[i] > 0]
    ranking = sorted(active, key=lambda i: -float(peaks[i]))
    rest = ranking[n_train:]
    bins = [rest[k * len(rest) // q : (k + 1) * len(rest) // q] for k in range(q)]
    assert [e.row for e in s.train] == ranking[:n_train]
    assert s.n_active == len(active) == 45 and s.n_contexts == n_rows
    for group in (s.test, s.extra):
        assert len(group) == q * per
        for e in group:
            assert e.row in bins[e.quantile]
            assert e.tokens == tokens[e.row].tolist() and e.activations == acts[e.row].tolist()
        assert [sum(e.quantile == k for e in group) for k in range(q)] == [per] * q
    assert all(peaks[e.row] == 0 for e in s.non_activating) and len(s.non_activating) == 10
    rows = [e.row for e in s.train + s.test + s.extra + s.non_activating]
    assert len(rows) == len(set(rows)), "a context was used twice"
    assert not s.notes

    again = sample_contexts(tokens, acts, n_train=n_train, n_test_per_quantile=per, n_quantiles=q, n_random=10, seed=3)
    other = sample_contexts(tokens, acts, n_train=n_train, n_test_per_quantile=per, n_quantiles=q, n_random=10, seed=4)
    assert again == s
    assert [e.row for e in other.test] != [e.row for e in s.test]


def test_sampler_windows_and_bos():
    tokens = torch.arange(48).reshape(4, 12)
    acts = torch.zeros(4, 12)
    acts[0, 0] = 9.0  # position 0: left out with skip_bos
    acts[1, 5] = 2.0  # row 1, window 1 (positions 4..7)
    acts[3, 11] = 1.0  # row 3, window 2
    s = sample_contexts(tokens, acts, n_train=1, n_test_per_quantile=1, n_quantiles=1, n_random=100, window=4)
    assert s.n_contexts == 12 and s.n_active == 2
    assert (s.train[0].row, s.train[0].start) == (1, 4)
    assert s.train[0].tokens == tokens[1, 4:8].tolist() and s.train[0].activations == [0, 2.0, 0, 0]
    assert (s.test[0].row, s.test[0].start) == (3, 8)
    assert len(s.non_activating) == 10
    with_bos = sample_contexts(tokens, acts, n_train=1, n_random=0, window=4, skip_bos=False)
    assert (with_bos.train[0].row, with_bos.train[0].start, with_bos.max_activation) == (0, 0, 9.0)


def test_sampler_rare_and_dead_latents():
    tokens, acts = synthetic_latent(n_rows=30, n_active=9)
    rare = sample_contexts(tokens, acts, n_train=20, n_quantiles=2, n_test_per_quantile=4)
    # 9 active contexts: 4 explain, 5 left in bins of 2 and 3, each split test/extra
    assert (len(rare.train), len(rare.test), len(rare.extra)) == (4, 1 + 2, 1 + 1)
    assert "only 9" in rare.notes[0]
    dead = sample_contexts(tokens, torch.zeros_like(acts), n_train=20)
    assert dead.n_active == 0 and not dead.train and "never fires" in dead.notes[0]
    everywhere = sample_contexts(tokens, torch.ones_like(acts), n_train=2, n_random=5)
    assert not everywhere.non_activating and "every context" in everywhere.notes[-1]
    with pytest.raises(ValueError, match="same"):
        sample_contexts(tokens, acts[:, :-1])


# --- prompts and parsing ----------------------------------------------------------


def test_render_marks_runs_and_escapes():
    assert render([" a", " b", " c", " d"], [False, True, True, False]) == " a<< b c>> d"
    assert render([" a", " b"], [True, True]) == "<< a b>>"
    assert render(["x", "\n", " <<", "y"], [False, False, False, True]) == "x↵ ‹‹<<y>>"
    assert marked_spans(" a<< b c>> d<<e>>") == [" b c", "e"]


def test_prompts_roundtrip():
    texts = [render(decode([1, 2, 3]), [False, True, False]), render(decode([4]), [False])]
    messages = classification_prompt("fuzzing", "the token w2", texts)
    assert example_texts(messages[-1]["content"]) == texts
    assert "the token w2" in messages[-1]["content"] and "2 integers" in messages[-1]["content"]
    prompt = explanation_prompt([decode([1, 2]), decode([3, 4])], [[0.0, 4.0], [2.0, 0.0]])
    user = prompt[-1]["content"]
    assert "Example 1:  w1<< w2>>" in user and "Example 2: << w3>> w4" in user
    assert "' w2': 10" in user and "' w3': 5" in user
    assert "Activations" not in explanation_prompt([decode([1])], [[1.0]], show_activations=False)[-1]["content"]


def test_parse_labels_and_explanations():
    assert parse_labels("Sure! Here you go: [1, 0, 1]", 3) == [1, 0, 1]
    assert parse_labels("draft [1,0] ... final answer [0, 1, 1]. Done", 3) == [0, 1, 1]
    assert parse_labels("[true, false]", 2) == [1, 0]
    for bad in ("[1, 0]", "[2, 0, 1]", "[1, 0, 1.0]", "no list here", '["1", "0", "1"]', "[1, 0, 1"):
        assert parse_labels(bad, 3) is None, bad
    assert parse_explanation("Let me think.\nExplanation: the word w7.") == "the word w7."
    assert parse_explanation('**Explanation:** "w7 tokens"\n') == "w7 tokens"
    assert parse_explanation("just a line\nthe last line") == "the last line"
    assert parse_explanation("  \n") is None


# --- scores -----------------------------------------------------------------------


@pytest.fixture
def samples():
    tokens, acts = synthetic_latent()
    return sample_contexts(tokens, acts, n_train=10, n_test_per_quantile=4, n_quantiles=5, n_random=20, seed=0)


def test_perfect_judge_scores_one(samples):
    client = FakeClient("the token w7", perfect_judge)
    score = explain_and_score(client, decode, samples, latent=3, batch_size=6)
    assert score.explanation == "the token w7"
    d, f = score.detection, score.fuzzing
    assert (d.tp, d.fn, d.tn, d.fp) == (len(samples.test), 0, len(samples.non_activating), 0)
    assert (f.tp, f.fn, f.tn, f.fp) == (len(samples.test), 0, len(samples.extra), 0)
    assert d.balanced_accuracy == f.balanced_accuracy == 1.0
    assert d.per_quantile == {q: [4, 4] for q in range(5)}
    assert d.n_batches == math.ceil(40 / 6) and d.n_unparsed == 0
    assert len(client.calls) == 1 + d.n_batches + f.n_batches
    assert "<<" in client.calls[0][-1]["content"]  # the explanation prompt shows marks


def test_always_yes_scores_one_half(samples):
    score = explain_and_score(FakeClient("anything", lambda kind, text: True), decode, samples)
    for result in (score.detection, score.fuzzing):
        assert result.tpr == 1.0 and result.tnr == 0.0 and result.balanced_accuracy == 0.5


def test_judge_wrong_on_half_the_negatives(samples):
    seen = {"negatives": 0}

    def judge(kind, text):
        if kind == "fuzzing" or perfect_judge(kind, text):
            return perfect_judge(kind, text)
        seen["negatives"] += 1
        return seen["negatives"] % 2 == 1  # says "fires" on the 1st, 3rd, ... negative

    score = explain_and_score(FakeClient("w7", judge), decode, samples)
    n_neg = len(samples.non_activating)
    d = score.detection
    assert (d.tp, d.fn, d.tn, d.fp) == (len(samples.test), 0, n_neg // 2, n_neg - n_neg // 2)
    assert d.balanced_accuracy == pytest.approx((1 + (n_neg // 2) / n_neg) / 2) == pytest.approx(0.75)
    assert score.fuzzing.balanced_accuracy == 1.0


def test_noise_flips_answers_deterministically(samples):
    inverted = explain_and_score(FakeClient("w7", perfect_judge, noise=1.0), decode, samples)
    assert inverted.detection.balanced_accuracy == inverted.fuzzing.balanced_accuracy == 0.0
    noisy = [explain_and_score(FakeClient("w7", perfect_judge, noise=0.3, seed=5), decode, samples) for _ in range(2)]
    assert noisy[0].to_dict() == noisy[1].to_dict()
    assert 0.4 < noisy[0].detection.balanced_accuracy < 0.95


class Unparseable(FakeClient):
    def complete(self, messages, *, max_tokens=256, temperature=0.0):
        answer = super().complete(messages, max_tokens=max_tokens, temperature=temperature)
        return answer if answer.startswith("Explanation") else "I am not sure."


def test_unparseable_answers_count_as_wrong(samples):
    score = explain_and_score(Unparseable("w7", perfect_judge), decode, samples, batch_size=5)
    d = score.detection
    n = len(samples.test) + len(samples.non_activating)
    assert (d.tp, d.fn, d.tn, d.fp) == (0, len(samples.test), 0, len(samples.non_activating))
    assert d.n_unparsed == n and d.n_failed_batches == d.n_batches == n // 5
    assert d.balanced_accuracy == 0.0
    summary = aggregate_scores([score])
    assert summary["detection"]["n_unparsed"] == n and summary["detection"]["mean"] == 0.0


def test_dead_and_saturated_latents_are_reported_not_scored():
    tokens, acts = synthetic_latent(n_rows=20, n_active=10)
    client = FakeClient("w7", perfect_judge)
    dead = explain_and_score(client, decode, sample_contexts(tokens, torch.zeros_like(acts)))
    assert dead.explanation is None and not client.calls and "not scored" in dead.notes[-1]
    single = explain_and_score(client, decode, sample_contexts(tokens, acts * (torch.arange(20) == 3)[:, None]))
    assert single.explanation is None and not client.calls and "left to test" in single.notes[-1]
    everywhere = explain_and_score(client, decode, sample_contexts(tokens, torch.ones_like(acts), n_train=2))
    assert math.isnan(everywhere.detection.balanced_accuracy)
    assert any("every context" in note for note in everywhere.notes)


def test_score_latents_and_aggregate():
    tokens, acts = synthetic_latent()
    stack = torch.stack([acts, torch.zeros_like(acts), acts])

    class FailsOnce(FakeClient):
        def complete(self, messages, **kw):
            if len(self.calls) == 0:
                self.calls.append(messages)
                raise LLMError("HTTP 503")
            return super().complete(messages, **kw)

    scores = score_latents(
        FailsOnce("w7", perfect_judge), decode, tokens, stack, latents=[10, 11, 12], n_train=10, n_test_per_quantile=2
    )
    assert [s.latent for s in scores] == [10, 11, 12]
    assert scores[0].error == "HTTP 503" and scores[1].explanation is None and scores[2].explanation == "w7"
    summary = aggregate_scores(scores)
    assert (summary["n_latents"], summary["n_failed"], summary["n_skipped"]) == (3, 1, 1)
    assert summary["detection"]["mean"] == 1.0 and summary["detection"]["n"] == 1
    assert math.isnan(summary["detection"]["sem"])  # one scored latent: no standard error
    json.dumps([s.to_dict() for s in scores])
    with pytest.raises(LLMError):
        score_latents(FailsOnce("w7", perfect_judge), decode, tokens, stack, raise_errors=True)

    halves = [
        explain_and_score(FakeClient("w7", j), decode, sample_contexts(tokens, acts))
        for j in (perfect_judge, lambda kind, text: True)
    ]
    summary = aggregate_scores(halves)
    assert summary["fuzzing"]["mean"] == pytest.approx(0.75)
    assert summary["fuzzing"]["sem"] == pytest.approx(0.25)  # std of (1, 0.5) = 0.3536, / sqrt(2)


def test_tokenizer_object_is_accepted(samples):
    class Tokenizer:
        def decode(self, ids):
            return "".join(f" w{i}" for i in ids)

    score = explain_and_score(FakeClient("w7", perfect_judge), Tokenizer(), samples)
    assert score.detection.balanced_accuracy == 1.0


# --- HTTP client ------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # the client hung up on purpose
        pass


MAX_REQUESTS, SERVER_LIFETIME_S = 50, 30.0
"""Bounds of every fake endpoint: requests answered, seconds before it stops itself."""


class _Handler(BaseHTTPRequestHandler):
    """Answers the n-th request with the n-th (status, body, delay) of `server.replies`
    (the last one again after the end), up to `MAX_REQUESTS` requests; later ones get
    HTTP 410, which the client does not retry."""

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append((self.path, dict(self.headers), body))
        if len(server.requests) > MAX_REQUESTS:
            status, text, delay = 410, '{"error": "the test server\'s request limit is reached"}', 0
        else:
            status, text, delay = server.replies[min(len(server.requests), len(server.replies)) - 1]
        time.sleep(delay)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(text.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    """`start(*replies)` serves a fake endpoint on 127.0.0.1 (see `_Handler`); it stops
    by itself after `SERVER_LIFETIME_S` seconds, at the latest at the end of the test."""
    servers, timers = [], []

    def start(*replies):
        server = _Server(("127.0.0.1", 0), _Handler)
        server.replies, server.requests = list(replies), []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        timer = threading.Timer(SERVER_LIFETIME_S, server.shutdown)
        timer.daemon = True
        timer.start()
        servers.append(server)
        timers.append(timer)
        return server, f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for server, timer in zip(servers, timers, strict=True):
        timer.cancel()
        server.shutdown()
        server.server_close()


def completion(content: str | list | None, finish_reason: str = "stop") -> str:
    message = {"role": "assistant", "content": content}
    return json.dumps({"choices": [{"index": 0, "message": message, "finish_reason": finish_reason}]})


def test_http_client_posts_chat_completions(endpoint):
    server, url = endpoint((200, completion("[1, 0]"), 0))
    client = OpenAICompatibleClient(url, "judge-model", api_key="k", timeout=5.0)
    messages = [{"role": "user", "content": "hi"}]
    assert client.complete(messages, max_tokens=7, temperature=0.5) == "[1, 0]"
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k"
    assert body == {"model": "judge-model", "messages": messages, "max_tokens": 7, "temperature": 0.5}


def test_http_client_errors(endpoint):
    server, url = endpoint((500, "boom", 0), (200, completion("ok"), 0))
    assert OpenAICompatibleClient(url, "m", retries=1, retry_wait=0.0).complete([]) == "ok"
    assert len(server.requests) == 2  # retried once after the 500

    server, url = endpoint((500, "boom", 0))
    with pytest.raises(LLMError, match="HTTP 500.*boom"):
        OpenAICompatibleClient(url, "m", retries=0).complete([])
    server, url = endpoint((401, '{"error": "bad key"}', 0))
    with pytest.raises(LLMError, match="HTTP 401.*bad key"):
        OpenAICompatibleClient(url, "m", retries=3, retry_wait=0.0).complete([])
    assert len(server.requests) == 1  # a client error is not retried
    _, url = endpoint((200, "<html>not json</html>", 0))
    with pytest.raises(LLMError, match="not a chat completion"):
        OpenAICompatibleClient(url, "m").complete([])
    _, url = endpoint((200, completion("late"), 0.6))
    with pytest.raises(LLMError, match="timed out"):
        OpenAICompatibleClient(url, "m", timeout=0.2, retries=0).complete([])

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(LLMError, match="failed"):
        OpenAICompatibleClient(f"http://127.0.0.1:{port}/v1", "m", retries=0).complete([])
    with pytest.raises(ValueError, match="http"):
        OpenAICompatibleClient("localhost:8000", "m")


def test_http_client_drives_the_pipeline(endpoint, samples):
    replies = [(200, completion("Explanation: w7"), 0)] + [(200, completion("[1, 1, 1, 1, 1]"), 0)] * 20
    server, url = endpoint(*replies)
    score = explain_and_score(OpenAICompatibleClient(url, "m"), decode, samples, batch_size=5)
    assert score.explanation == "w7" and score.detection.balanced_accuracy == 0.5
    assert len(server.requests) == 1 + score.detection.n_batches + score.fuzzing.n_batches


def test_http_client_reply_shapes_and_failure_kinds(endpoint):
    parts = [{"type": "text", "text": "[1, "}, {"type": "text", "text": "0]"}]
    _, url = endpoint((200, completion(parts, "length"), 0), (200, completion(None), 0))
    client = OpenAICompatibleClient(url, "m")
    answer = client.complete([])
    assert answer == "[1, 0]" and isinstance(answer, Completion) and answer.finish_reason == "length"
    assert client.complete([]) == ""  # null content: no text
    refused = {"choices": [{"message": {"content": None, "refusal": "I cannot help"}, "finish_reason": "stop"}]}
    _, url = endpoint((200, json.dumps(refused), 0))
    assert OpenAICompatibleClient(url, "m").complete([]) == "I cannot help"

    def kind(*replies, **options):
        _, url = endpoint(*replies)
        with pytest.raises(LLMError) as info:
            OpenAICompatibleClient(url, "m", retry_wait=0.0, **options).complete([])
        return info.value.kind, str(info.value)

    failure, message = kind((200, '{"error": {"message": "model overloaded"}}', 0))
    assert failure == "malformed"
    assert message.endswith(
        "/v1/chat/completions answered an error with HTTP 200, not a chat completion: "
        '{"error": {"message": "model overloaded"}}'
    )
    assert kind((200, '{"detail": "pinned model"}', 0))[0] == "malformed"
    assert kind((200, "<html>busy</html>", 0))[0] == "malformed"
    assert kind((200, '{"choices": []}', 0))[0] == "malformed"
    assert kind((200, completion(42), 0))[0] == "malformed"
    assert kind((503, "down", 0), retries=1)[0] == "http"
    assert kind((200, completion("late"), 0.5), timeout=0.1, retries=0)[0] == "timeout"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(LLMError) as info:
        OpenAICompatibleClient(f"http://127.0.0.1:{port}/v1", "m", retries=0).complete([])
    assert info.value.kind == "connection"
    assert LLMError("no kind given").kind == "other"


@pytest.fixture
def few_samples():
    """One detection batch and one fuzzing batch of 4 samples each (batch_size=4)."""
    tokens, acts = synthetic_latent(n_rows=40, n_active=20)
    s = sample_contexts(tokens, acts, n_train=4, n_test_per_quantile=1, n_quantiles=2, n_random=2)
    assert len(s.test) + len(s.non_activating) == len(s.test) + len(s.extra) == 4
    return s


EXPLAINED = (200, completion("Explanation: the token w7"), 0)
ALL_YES = (200, completion("[1, 1, 1, 1]"), 0)
ASK_LABELS = "Reply with only a JSON list of 4 integers (0 or 1)."
DETECTION_FAULTS = {  # the detection batch's replies before ALL_YES: (replies, re-asked, still unparsed)
    "malformed list": ([(200, completion("[1, 0, 1"), 0)], 1, 0),
    "wrong length, then right": ([(200, completion("Sure: [1, 0]"), 0)], 1, 0),
    "refusal, twice": ([(200, completion("I cannot help with that."), 0)] * 2, 1, 1),
    "cut off": ([(200, completion("Let me look at each excerpt in turn. Excerpt 1", "length"), 0)], 1, 0),
    "null content": ([(200, completion(None), 0)], 1, 0),
    "body not JSON": ([(200, "<html>busy</html>", 0)], 1, 0),
    "error object with 200": ([(200, '{"error": {"message": "overloaded"}}', 0)], 1, 0),
    "500, then success": ([(500, "boom", 0)], 0, 0),  # the client's own retry, no re-ask
}


@pytest.mark.parametrize("fault", DETECTION_FAULTS)
def test_faulty_label_answers_are_reasked_once(endpoint, few_samples, fault):
    replies, retried, unparsed = DETECTION_FAULTS[fault]
    server, url = endpoint(EXPLAINED, *replies, ALL_YES)
    client = OpenAICompatibleClient(url, "m", timeout=5.0, retries=1, retry_wait=0.0)
    score = explain_and_score(client, decode, few_samples, batch_size=4)
    d, f = score.detection, score.fuzzing
    assert score.error is None and score.explanation == "the token w7"
    assert (d.n_batches, d.n_retried, d.n_failed_batches, d.n_unparsed) == (1, retried, unparsed, 4 * unparsed)
    assert (f.n_batches, f.n_retried, f.n_unparsed) == (1, 0, 0) and f.balanced_accuracy == 0.5
    assert len(server.requests) == 1 + len(replies) + (not unparsed) + 1
    assert (d.balanced_accuracy == 0.5) == (not unparsed)
    if retried:
        followed = server.requests[2][2]["messages"]
        roles = [m["role"] for m in followed]
        assert roles in (["system", "user", "assistant", "user"], ["system", "user"])  # roles alternate
        assert followed[-1]["content"].endswith(ASK_LABELS)
        assert any("detection: 1 of 1 batches re-asked" in note for note in score.notes)
    summary = aggregate_scores([score])
    assert summary["detection"]["n_retried"] == retried and summary["detection"]["n_unparsed"] == 4 * unparsed


def test_faulty_explanations_are_reasked_once(endpoint, few_samples):
    cut_off = (200, completion("The marked tokens all seem to", "length"), 0)
    server, url = endpoint(cut_off, EXPLAINED, ALL_YES)
    score = explain_and_score(OpenAICompatibleClient(url, "m"), decode, few_samples, batch_size=4)
    assert score.explanation == "the token w7" and score.explanation_retried and score.error is None
    assert any("explanation re-asked" in note and "cut off" in note for note in score.notes)
    assert server.requests[1][2]["messages"][-1]["content"].startswith("Reply with only one line")

    refusal = (200, completion("I'm sorry, I can't help with that."), 0)
    server, url = endpoint(refusal)
    score = explain_and_score(OpenAICompatibleClient(url, "m"), decode, few_samples, batch_size=4)
    assert score.explanation is None and score.failure == "malformed" and "a refusal" in score.error
    assert len(server.requests) == 2 and score.explanation_retried
    summary = aggregate_scores([score])
    assert summary["failures"] == {"malformed": 1} and summary["n_explanations_retried"] == 1

    _, url = endpoint(refusal)
    score = explain_and_score(OpenAICompatibleClient(url, "m"), decode, few_samples, reask=False)
    assert score.failure == "malformed" and not score.explanation_retried


def test_score_latents_gives_each_option_to_the_function_that_takes_it():
    tokens, acts = synthetic_latent()
    options = dict(n_train=3, batch_size=2, seed=1)  # one for sample_contexts, one for explain_and_score, one for both
    [score] = score_latents(FakeClient("w7", perfect_judge), decode, tokens, acts[None], **options)
    samples = sample_contexts(tokens, acts, n_train=3, seed=1)
    alone = explain_and_score(FakeClient("w7", perfect_judge), decode, samples, 0, batch_size=2, seed=1)
    assert score.to_dict() == alone.to_dict()
    assert score.detection.n_batches == -(-(len(samples.test) + len(samples.non_activating)) // 2)
    with pytest.raises(AnalysisError, match=r"unknown options \['n_trian'\].*n_train"):
        score_latents(FakeClient("w7", perfect_judge), decode, tokens, acts[None], n_trian=3)


def test_the_run_goes_on_past_failing_latents(endpoint):
    tokens, acts = synthetic_latent(n_rows=40, n_active=20)
    slow = (200, completion("Explanation: too late"), 0.6)
    server, url = endpoint(slow, EXPLAINED, ALL_YES, ALL_YES, (500, "down", 0))
    client = OpenAICompatibleClient(url, "m", timeout=0.2, retries=0)
    start = time.monotonic()
    scores = score_latents(
        client,
        decode,
        tokens,
        torch.stack([acts] * 3),
        latents=[5, 6, 7],
        n_train=4,
        n_test_per_quantile=1,
        n_quantiles=2,
        n_random=2,
        batch_size=4,
    )
    assert time.monotonic() - start < 5
    assert [s.failure for s in scores] == ["timeout", None, "http"]
    assert "timed out" in scores[0].error and "HTTP 500" in scores[2].error
    assert scores[1].explanation == "the token w7" and scores[1].detection.balanced_accuracy == 0.5
    assert len(server.requests) == 5
    summary = aggregate_scores(scores)
    assert summary["n_failed"] == 2 and summary["failures"] == {"timeout": 1, "http": 1}
    assert summary["detection"]["n"] == 1


def test_latent_timeout_and_unexpected_client_errors(few_samples):
    tokens, acts = synthetic_latent(n_rows=40, n_active=20)
    stack = torch.stack([acts, acts])
    options = dict(latents=[1, 2], n_train=4, n_test_per_quantile=1, n_quantiles=2, n_random=2, batch_size=4)

    class SlowOnce(FakeClient):
        n_asked = 0

        def complete(self, messages, **kw):
            self.n_asked += 1
            if self.n_asked == 2:  # the first latent's detection batch hangs
                time.sleep(3.0)
            return super().complete(messages, **kw)

    start = time.monotonic()
    scores = score_latents(SlowOnce("w7", perfect_judge), decode, tokens, stack, latent_timeout=0.3, **options)
    assert time.monotonic() - start < 2.0  # the hanging request was left behind
    assert scores[0].failure == "budget" and "latent_timeout=0.3" in scores[0].error
    assert scores[1].error is None and scores[1].detection.balanced_accuracy == 1.0
    with pytest.raises(ValueError, match="latent_timeout"):
        explain_and_score(FakeClient("w7", perfect_judge), decode, few_samples, latent_timeout=0.0)

    class Buggy(FakeClient):
        def complete(self, messages, **kw):
            if not self.calls:
                self.calls.append(messages)
                raise KeyError("choices")
            return super().complete(messages, **kw)

    scores = score_latents(Buggy("w7", perfect_judge), decode, tokens, stack, **options)
    assert scores[0].failure == "client" and scores[0].error == "the client raised KeyError: 'choices'"
    assert scores[1].explanation == "w7" and aggregate_scores(scores)["failures"] == {"client": 1}
    with pytest.raises(LLMError) as info:
        score_latents(Buggy("w7", perfect_judge), decode, tokens, stack, raise_errors=True, **options)
    assert isinstance(info.value.__cause__, KeyError)

    class NotText(FakeClient):
        def complete(self, messages, **kw):
            answer = super().complete(messages, **kw)
            return answer if answer.startswith("Explanation") else None

    score = explain_and_score(NotText("w7", perfect_judge), decode, few_samples, batch_size=4)
    assert (score.detection.n_retried, score.detection.n_failed_batches) == (1, 1)


def test_reask_with_fake_clients(samples):
    class GarblesOnce(FakeClient):
        def complete(self, messages, **kw):
            answer = super().complete(messages, **kw)
            return "[1, 0" if len(self.calls) == 2 else answer  # the first detection batch

    client = GarblesOnce("w7", perfect_judge)
    score = explain_and_score(client, decode, samples, batch_size=5)
    assert score.detection.n_retried == 1 and score.detection.balanced_accuracy == 1.0
    assert [m["role"] for m in client.calls[2]] == ["system", "user", "assistant", "user"]

    client = Unparseable("w7", perfect_judge)
    score = explain_and_score(client, decode, samples, batch_size=5, reask=False)
    assert len(client.calls) == 1 + score.detection.n_batches + score.fuzzing.n_batches
    assert score.detection.n_retried == 0 and score.detection.n_failed_batches == score.detection.n_batches


# --- latent activations on a model ------------------------------------------------


def hand_captured_input(model, transcoder, tokens):
    """The transcoder's input captured by a hand-written hook (an MLP pre-hook for
    `mlp.hook_in`, else a TL hook), independent of `sites`."""
    cfg, captured = transcoder.cfg, {}
    if cfg.input_site.endswith("mlp.hook_in"):
        handle = model.blocks[cfg.layer].mlp.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
        try:
            model(tokens)
        finally:
            handle.remove()
    else:
        model.run_with_hooks(tokens, fwd_hooks=[(cfg.input_site, lambda act, hook: captured.update(x=act))])
    return captured["x"]


def test_latent_activations_match_a_direct_encode(model, tokens):
    transcoder = make_transcoder(model, 1, activation="topk")
    with torch.no_grad():
        expected = transcoder.encode(hand_captured_input(model, transcoder, tokens))
    busiest = int((expected > 0).sum((0, 1)).argmax())
    latents = [busiest, 47 - busiest, 47]
    got = latent_activations(model, transcoder, tokens, latents, batch_size=2)
    assert got.shape == (3, *tokens.shape)
    assert torch.allclose(got, expected[..., latents].permute(2, 0, 1), atol=1e-5)
    assert (got[0] > 0).any()
    with pytest.raises(ValueError, match="out of range"):
        latent_activations(model, transcoder, tokens, [48])
