"""Build the embedded public-domain corpus shipped in `tl_transcoders/corpus/`.

Reads the three public-domain sources of the shared offline corpus (gzip JSON Lines,
one `{"text", "source"}` record per chunk; see its README) and keeps, per source, the
chunks with the smallest SHA-1 of their text until the source's character budget is
spent: a deterministic, order-free sample. The train split draws from the corpus's
`train/` files, the held-out split from its `heldout/` files (disjoint by construction).
Output files are written with a fixed gzip timestamp, so rebuilding gives the same bytes.

    python scripts/build_corpus.py --shared ../shared/data/corpus
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

SOURCES = ("bible_web", "henry_mhcc", "spurgeon_tdavid")
"""The public-domain sources (World English Bible; Matthew Henry's concise commentary;
Spurgeon's Treasury of David)."""

OUT = Path(__file__).resolve().parent.parent / "tl_transcoders" / "corpus"


def read_chunks(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def sample(chunks: list[dict], budget: int) -> list[dict]:
    """Chunks in SHA-1 order of their text until `budget` characters are taken."""
    chosen, used = [], 0
    for chunk in sorted(chunks, key=lambda c: hashlib.sha1(c["text"].encode()).hexdigest()):
        if used >= budget:
            break
        chosen.append({"text": chunk["text"], "source": chunk["source"]})
        used += len(chunk["text"])
    return chosen


def write(path: Path, records: list[dict]) -> None:
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared/data/corpus"))
    parser.add_argument("--train-chars", type=int, default=1_900_000, help="per source")
    parser.add_argument("--heldout-chars", type=int, default=160_000, help="per source")
    args = parser.parse_args()
    for split, budget in (("train", args.train_chars), ("heldout", args.heldout_chars)):
        records = []
        for source in SOURCES:
            records += sample(read_chunks(args.shared / split / f"{source}.jsonl.gz"), budget)
        write(OUT / f"{split}.jsonl.gz", records)
        chars = sum(len(r["text"]) for r in records)
        size = (OUT / f"{split}.jsonl.gz").stat().st_size
        print(f"{split}: {len(records)} chunks, {chars:,} characters, {size:,} bytes compressed")


if __name__ == "__main__":
    main()
