"""Streaming detokenization cost: `TextStream.push` over one long reply, token by token.

The server pushes every generated token through a TextStream (stop strings, unfinished UTF-8 held
back). This feeds the first N tokens of a real text (WikiText-2 valid, encoded with the given
tokenizer) and reports the total time, the time of the last 100 pushes per token (where a
decoder that re-decodes the whole reply at every token is slowest) and whether the streamed text
equals one decode of all the ids.

Usage: .venv/bin/python benchmarks/text_stream.py TOKENIZER.json [--tokens 2000] [--stop STRING]
One JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from hybridlm.inference.text import TextStream
from hybridlm.tokenizer import TextTokenizer

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizer", type=Path)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--stop", default="\u241e", help="a stop string (default: one the text never holds)")
    args = parser.parse_args()
    tokenizer = TextTokenizer.load(args.tokenizer)
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"))[: args.tokens]
    stream = TextStream(tokenizer, (args.stop,))
    pieces, stamps = [], []
    start = time.perf_counter()
    for token in ids:
        pieces.append(stream.push(token))
        stamps.append(time.perf_counter())
    pieces.append(stream.flush())
    total = time.perf_counter() - start
    last = (stamps[-1] - stamps[-101]) / 100
    print(json.dumps({"cpu": platform.processor() or platform.machine(), "tokens": len(ids), "total_s": total,
                      "per_token_last_100_us": last * 1e6, "per_token_mean_us": total / len(ids) * 1e6,
                      "stopped": stream.stopped, "equals_one_decode": "".join(pieces) == tokenizer.decode(ids)},
                     indent=2))


if __name__ == "__main__":
    main()
