"""Token batches: loading local corpora and packing documents into rows, offline.

The tokenizer is a word-level one where word `tN` is token id N (N >= 3), so expected
rows can be read off the text; <bos> is 0, <eos> 1 and <unk> 2.
"""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tl_transcoders.io import data
from tl_transcoders.io.data import load_text_dataset, token_batches

BOS, EOS = 0, 1
VOCAB = 60


def make_tokenizer(**kwargs):
    vocab = {"<bos>": BOS, "<eos>": EOS, "<unk>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", **kwargs
    )


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def text(ids):
    return " ".join(f"t{i}" for i in ids)


def write_jsonl(path, rows):
    """Write dicts as JSON lines (gzipped for a .gz path); returns the path."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def load(path, tmp_path, **kwargs):
    return load_text_dataset(path, cache_dir=str(tmp_path / "cache"), **kwargs)


def as_lists(batches):
    return [batch.tolist() for batch in batches]


def reference_rows(documents, context_size, bos, separator):
    """Every full row of the packed stream, written the obvious way."""
    stream = []
    for ids in (d for d in documents if d):
        if stream and separator is not None:
            stream.append(separator)
        stream += ids
    width = context_size - (bos is not None)
    prefix = [bos] if bos is not None else []
    return [prefix + stream[i : i + width] for i in range(0, len(stream) - width + 1, width)]


def random_documents(n, seed=0):
    """n documents of 0-12 tokens (some empty)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(0, 13))] for _ in range(n)]


HAND_MADE = [[3, 4, 5], [6, 7], [8, 9, 10, 11, 12], [13]]
# stream: 3 4 5 <eos> 6 7 <eos> 8 9 10 11 12 <eos> 13


@pytest.mark.parametrize("streaming", [False, True])
def test_packs_a_hand_made_corpus_exactly(tokenizer, tmp_path, streaming):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text(d)} for d in HAND_MADE])
    dataset = load(path, tmp_path, streaming=streaming)
    batches = list(token_batches(dataset, tokenizer, context_size=4, batch_size=2))
    assert all(b.dtype == torch.int64 and b.shape == (2, 4) for b in batches)
    assert as_lists(batches) == [
        [[BOS, 3, 4, 5], [BOS, EOS, 6, 7]],  # separator between documents, even at a row's start
        [[BOS, EOS, 8, 9], [BOS, 10, 11, 12]],  # document 3 continues into the next row
    ]  # the tail (<eos> 13) fills no row and is dropped


def test_without_bos_or_separator(tokenizer):
    dataset = Dataset.from_dict({"text": [text(d) for d in HAND_MADE]})
    batches = token_batches(dataset, tokenizer, 3, 1, bos_token_id=None, separator_token_id=None)
    assert as_lists(batches) == [[[3, 4, 5]], [[6, 7, 8]], [[9, 10, 11]]]


def test_explicit_special_tokens_and_tokenizer_defaults(tokenizer):
    dataset = Dataset.from_dict({"text": [text(d) for d in HAND_MADE]})
    default = as_lists(token_batches(dataset, tokenizer, 4, 1))
    assert default == as_lists(token_batches(dataset, tokenizer, 4, 1, bos_token_id=BOS, separator_token_id=EOS))
    custom = as_lists(token_batches(dataset, tokenizer, 4, 1, bos_token_id=50, separator_token_id=51))
    assert custom == [[r] for r in reference_rows(HAND_MADE, 4, 50, 51)][: len(custom)]


def test_text_is_tokenized_without_the_tokenizers_special_tokens():
    from tokenizers import processors

    tokenizer = make_tokenizer()  # a tokenizer that adds BOS and EOS itself, as TransformerLens sets one up
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", BOS), ("<eos>", EOS)]
    )
    assert tokenizer("t3")["input_ids"] == [BOS, 3, EOS]
    dataset = Dataset.from_dict({"text": [text(d) for d in HAND_MADE]})
    assert as_lists(token_batches(dataset, tokenizer, 4, 1))[:2] == [[[BOS, 3, 4, 5]], [[BOS, EOS, 6, 7]]]


@pytest.mark.parametrize(
    "context_size, batch_size, bos, separator",
    [(8, 3, BOS, EOS), (5, 7, None, EOS), (2, 1, BOS, None), (16, 2, None, None)],
)
def test_matches_reference_packing_across_tokenizer_calls(tokenizer, context_size, batch_size, bos, separator):
    documents = random_documents(3 * data.TOKENIZE_BATCH + 17)
    dataset = Dataset.from_dict({"text": [text(d) for d in documents]})
    rows = reference_rows(documents, context_size, bos, separator)
    expected = [rows[i : i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]
    batches = token_batches(
        dataset, tokenizer, context_size, batch_size, bos_token_id=bos, separator_token_id=separator
    )
    assert as_lists(batches) == expected


def test_pretokenized_input_ids(tokenizer, tmp_path):
    documents = random_documents(300, seed=1)
    from_text = as_lists(token_batches(Dataset.from_dict({"text": [text(d) for d in documents]}), tokenizer, 8, 4))
    pretokenized = Dataset.from_dict({"input_ids": documents, "text": ["ignored"] * len(documents)})
    assert as_lists(token_batches(pretokenized, tokenizer, 8, 4)) == from_text
    no_tokenizer = token_batches(pretokenized, None, 8, 4, bos_token_id=BOS, separator_token_id=EOS)
    assert as_lists(no_tokenizer) == from_text
    path = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": d} for d in documents])
    streamed = load(path, tmp_path, streaming=True)
    assert as_lists(token_batches(streamed, tokenizer, 8, 4)) == from_text
    torch_format = pretokenized.with_format("torch")
    assert as_lists(token_batches(torch_format, tokenizer, 8, 4)) == from_text


def test_streaming_equals_map_style(tokenizer, tmp_path):
    documents = random_documents(700, seed=2)
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text(d), "meta": i} for i, d in enumerate(documents)])
    map_style = as_lists(token_batches(load(path, tmp_path), tokenizer, 16, 4))
    streamed = as_lists(token_batches(load(path, tmp_path, streaming=True), tokenizer, 16, 4))
    assert len(map_style) > 10 and streamed == map_style
    unknown_columns = (
        Dataset.from_dict({"text": [text(d) for d in documents]}).to_iterable_dataset().map(lambda row: row)
    )
    assert unknown_columns.column_names is None
    assert as_lists(token_batches(unknown_columns, tokenizer, 16, 4)) == map_style


def test_max_tokens_rounds_down_to_whole_batches(tokenizer):
    dataset = Dataset.from_dict({"text": [text(d) for d in random_documents(300, seed=3)]})
    full = as_lists(token_batches(dataset, tokenizer, 8, 4))
    assert len(full) > 3
    assert as_lists(token_batches(dataset, tokenizer, 8, 4, max_tokens=3 * 32)) == full[:3]
    assert as_lists(token_batches(dataset, tokenizer, 8, 4, max_tokens=3 * 32 + 31)) == full[:3]
    assert as_lists(token_batches(dataset, tokenizer, 8, 4, max_tokens=10**9)) == full
    with pytest.raises(ValueError, match="less than one batch"):
        token_batches(dataset, tokenizer, 8, 4, max_tokens=31)


@pytest.mark.parametrize("streaming", [False, True])
def test_skip_batches_equals_dropping_them(tokenizer, tmp_path, streaming):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text(d)} for d in random_documents(400, seed=4)])
    dataset = load(path, tmp_path, streaming=streaming)
    full = as_lists(token_batches(dataset, tokenizer, 8, 3))
    for skip in (0, 1, 5, len(full) - 1, len(full), len(full) + 3):
        assert as_lists(token_batches(dataset, tokenizer, 8, 3, skip_batches=skip)) == full[skip:]
    capped = as_lists(token_batches(dataset, tokenizer, 8, 3, max_tokens=6 * 24, skip_batches=2))
    assert capped == full[2:6]  # max_tokens counts the skipped batches


def test_too_little_data_raises(tokenizer):
    empty = Dataset.from_dict({"text": []})
    with pytest.raises(ValueError, match=r"no full batch of batch_size x context_size = 2 x 4 tokens"):
        list(token_batches(empty, tokenizer, 4, 2))
    short = Dataset.from_dict({"text": [text(d) for d in HAND_MADE]})  # 14 stream tokens
    with pytest.raises(ValueError, match=r"no full batch of .* 3 x 8 tokens.*4 non-empty documents, 11 tokens"):
        list(token_batches(short, tokenizer, 8, 3))


def test_missing_text_column_lists_the_columns(tokenizer, tmp_path):
    dataset = Dataset.from_dict({"content": ["t3 t4"], "url": ["x"]})
    with pytest.raises(ValueError, match=r"no text column 'text'.*\['content', 'url'\]"):
        token_batches(dataset, tokenizer, 4, 1)
    assert as_lists(token_batches(dataset, tokenizer, 3, 1, text_column="content")) == [[[BOS, 3, 4]]]
    unknown_columns = dataset.to_iterable_dataset().map(lambda row: row)
    with pytest.raises(ValueError, match=r"no text column 'text'.*\['content', 'url'\]"):
        list(token_batches(unknown_columns, tokenizer, 4, 1))


@pytest.mark.parametrize("context_size, batch_size", [(1, 4), (0, 4), (4, 0), (4, -1)])
def test_bad_sizes_raise(tokenizer, context_size, batch_size):
    dataset = Dataset.from_dict({"text": ["t3 t4"]})
    with pytest.raises(ValueError, match="context_size must be at least 2|batch_size must be at least 1"):
        token_batches(dataset, tokenizer, context_size, batch_size)


def test_text_without_tokenizer_raises():
    with pytest.raises(ValueError, match="pass a tokenizer"):
        token_batches(Dataset.from_dict({"text": ["t3"]}), None, 4, 1, bos_token_id=None, separator_token_id=None)
    with pytest.raises(ValueError, match="bos_token_id: there is no tokenizer"):
        token_batches(Dataset.from_dict({"input_ids": [[3]]}), None, 4, 1)


@pytest.mark.parametrize("streaming", [False, True])
def test_directory_and_glob_of_jsonl_gz(tokenizer, tmp_path, streaming):
    documents = random_documents(120, seed=5)
    shards = tmp_path / "shards"
    (shards / "part").mkdir(parents=True)
    write_jsonl(shards / "b.jsonl.gz", [{"text": text(d)} for d in documents[40:80]])
    write_jsonl(shards / "a.jsonl.gz", [{"text": text(d)} for d in documents[:40]])
    write_jsonl(shards / "part" / "c.jsonl.gz", [{"text": text(d)} for d in documents[80:]])
    (shards / "README.md").write_text("not data")
    expected = as_lists(token_batches(Dataset.from_dict({"text": [text(d) for d in documents]}), tokenizer, 8, 2))
    for path in (shards, str(shards / "**" / "*.jsonl.gz")):
        dataset = load(path, tmp_path, streaming=streaming)
        assert as_lists(token_batches(dataset, tokenizer, 8, 2)) == expected, path
    top_level = load(str(shards / "*.jsonl.gz"), tmp_path, streaming=streaming)  # a.jsonl.gz, b.jsonl.gz
    first_80 = Dataset.from_dict({"text": [text(d) for d in documents[:80]]})
    assert as_lists(token_batches(top_level, tokenizer, 8, 2)) == as_lists(token_batches(first_80, tokenizer, 8, 2))


def test_text_and_parquet_files(tokenizer, tmp_path):
    documents = random_documents(50, seed=6)
    (tmp_path / "corpus.txt").write_text("\n".join(text(d) for d in documents if d) + "\n")
    Dataset.from_dict({"text": [text(d) for d in documents]}).to_parquet(str(tmp_path / "corpus.parquet"))
    expected = as_lists(token_batches(Dataset.from_dict({"text": [text(d) for d in documents]}), tokenizer, 8, 2))
    for name in ("corpus.txt", "corpus.parquet"):
        dataset = load(tmp_path / name, tmp_path, split="validation")
        assert as_lists(token_batches(dataset, tokenizer, 8, 2)) == expected, name


def test_builder_name_with_data_files(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text(d)} for d in HAND_MADE])
    dataset = load("json", tmp_path, data_files=[str(path)])
    assert len(dataset) == len(HAND_MADE)


def test_nothing_matching_names_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.md").write_text("x")
    for path in (tmp_path / "missing.jsonl", str(tmp_path / "*.jsonl.gz"), tmp_path / "empty", "./no/such/dir"):
        with pytest.raises(FileNotFoundError, match="no data files match") as error:
            load_text_dataset(path)
        assert str(path) in str(error.value)
    with pytest.raises(ValueError, match="cannot tell the format of"):
        load_text_dataset(tmp_path / "notes.md")


def test_hub_names_go_to_load_dataset(monkeypatch):
    calls, loaded = [], Dataset.from_dict({"text": ["t3"]})
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)) or loaded)
    assert load_text_dataset("NeelNanda/pile-10k", split="train", streaming=True, revision="main") is loaded
    assert calls == [(("NeelNanda/pile-10k",), dict(split="train", streaming=True, data_files=None, revision="main"))]
