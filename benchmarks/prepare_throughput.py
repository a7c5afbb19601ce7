"""Encoding throughput of `hybridlm prepare` (byte-level BPE, parallel batches) next to SentencePiece.

Trains both tokenizers (BPE, vocabulary 8192) on WikiText-2 train, then times encoding the same
10.8 MB: hybridlm's whole prepare step (read, encode on all cores, write shards), the bare HF
`tokenizers` encode_batch, and SentencePiece's encode (its own threads). Prints MB/s.

Usage: .venv/bin/python benchmarks/prepare_throughput.py [--data ../shared/data/wikitext-2/train.txt]
Needs the [bench] extra (sentencepiece).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from hybridlm.data.prepare import prepare
from hybridlm.data.sources import iter_documents, resolve_source
from hybridlm.timing import seconds as timed
from hybridlm.tokenizer import train_tokenizer

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "train.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT)
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    import sentencepiece as spm

    mb = args.data.stat().st_size / 1e6
    docs = list(iter_documents(resolve_source(str(args.data))))
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(docs, vocab_size=args.vocab_size)
        tok.save(Path(tmp) / "tokenizer.json")
        prepare_s = min(timed(lambda: prepare([str(args.data)], Path(tmp) / "tokenizer.json", Path(tmp) / "d"))
                        for _ in range(2))
        hf_s = min(timed(lambda: tok.encode_batch(docs)) for _ in range(2))
        spm.SentencePieceTrainer.train(input=str(args.data), model_prefix=f"{tmp}/sp", vocab_size=args.vocab_size,
                                       model_type="bpe", num_threads=2, minloglevel=2)
        sp = spm.SentencePieceProcessor(model_file=f"{tmp}/sp.model")
        sp_s = min(timed(lambda: sp.encode(docs, num_threads=2)) for _ in range(2))
    result = {"mb": mb, "hybridlm_prepare_mb_s": mb / prepare_s, "hf_tokenizers_encode_batch_mb_s": mb / hf_s,
              "sentencepiece_bpe_encode_mb_s": mb / sp_s}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
