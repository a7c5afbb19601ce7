"""`hybridlm rm score`: a reward model's score of each reply in a JSONL file.

A line is `{"prompt", "response"}` (one reply) or `{"prompt", "chosen", "rejected"}` (a pair, as
rm and dpo stages read them); prompts and replies take the same forms as there (a string, or
OpenAI-style messages). Each line comes back with "reward" (or "reward_chosen" and
"reward_rejected"); pairs also give the pairwise accuracy (a tie is not a win).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hybridlm.data.pair_rows import encode_pairs
from hybridlm.data.preferences import PreferencePair, parse_prompt, parse_reply
from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_text, jsonl_records
from hybridlm.run import load_run_on_device
from hybridlm.train.objectives.rm import reply_rewards


def _line_pair(record: object, where: str) -> tuple[PreferencePair, bool]:
    """(the line as a pair, whether it is one); a single response fills both sides."""
    if not isinstance(record, dict) or "prompt" not in record:
        raise UserError(f"{where}: expected an object with 'prompt' and 'response' (or 'chosen' and 'rejected')")
    prompt = parse_prompt(record["prompt"], where)
    if "response" in record:
        reply = parse_reply(record, "response", where)
        return PreferencePair(prompt, reply, reply), False
    return PreferencePair(prompt, parse_reply(record, "chosen", where), parse_reply(record, "rejected", where)), True


def score_file(model_dir: Path, data: Path, out: Path | None, dtype: str = "auto") -> dict:
    run, resolved = load_run_on_device(model_dir, dtype)
    if run.model.cfg.head != "reward":
        raise UserError(f"{model_dir} is not a reward model (model.head = {run.model.cfg.head!r}); train one "
                        "with train.objective = \"rm\"")
    if not Path(data).is_file():
        raise UserError(f"{data} not found; give a JSONL file of {{prompt, response}} or {{prompt, chosen, rejected}}")
    records = list(jsonl_records(Path(data)))
    parsed = [_line_pair(record, f"{data}: line {line}") for line, record in records]
    if not parsed:
        raise UserError(f"{data} holds no lines to score")
    encoded = encode_pairs(run.tokenizer, [pair for pair, _ in parsed])
    seq_len, pad = run.model.cfg.max_seq_len, run.tokenizer.special_ids["pad"]
    prompts = [e.prompt for e in encoded]
    chosen = reply_rewards(run.model, prompts, [e.chosen for e in encoded], seq_len, pad, resolved)
    rejected = reply_rewards(run.model, prompts, [e.rejected for e in encoded], seq_len, pad, resolved)
    lines, wins, pairs = [], 0, 0
    for (_, record), (_, is_pair), c, r in zip(records, parsed, chosen.tolist(), rejected.tolist()):
        if is_pair:
            lines.append({**record, "reward_chosen": c, "reward_rejected": r})
            pairs, wins = pairs + 1, wins + (c > r)
        else:
            lines.append({**record, "reward": c})
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    if out is not None:
        atomic_write_text(Path(out), text)
    scores = torch.tensor([line.get("reward", line.get("reward_chosen")) for line in lines], dtype=torch.float64)
    return {"model": str(model_dir), "lines": len(lines), "pairs": pairs, "accuracy": wins / pairs if pairs else None,
            "mean": float(scores.mean()), "out": str(out) if out else None, "scored": text}
