"""The three requests every benchmark reduces to, answered by one loaded run: log-likelihood of a
continuation, rolling log-likelihood of a whole text, and greedy generation until a stop string.

The definitions follow lm-evaluation-harness's HFLM, so `hybridlm eval run` and lm-eval (through
interop/lm_eval_plugin.py, which calls this class) score the same tokens:
- context + continuation are tokenized the HFLM way: trailing whitespace of the context moves to
  the front of the continuation, the joined text is encoded once and cut at the length of the
  encoded context (the continuation's tokens are those the model sees in the joined text);
- every sequence starts with the eos token, the document boundary our training streams put
  before each document (HFLM with a tokenizer that adds a BOS token behaves the same way);
- sequences longer than the context keep their last tokens (left truncation); a continuation
  longer than the context is scored piece by piece;
- rolling windows are lm-eval's disjoint windows (context_len=1): each block of `context`
  predicted tokens sees only the token before it, the last block as much text as fits.

Requests are batched: sorted by length (longest first, ties broken by the tokens, so the batches
depend only on the set of requests), padded on the right and scored with one forward per batch.
Right padding cannot change a causal model's logits at real positions, so results do not depend
on the batch size (up to float rounding of the differently shaped matmuls).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from hybridlm.device import autocast
from hybridlm.errors import UserError
from hybridlm.inference.decode import generate_ids
from hybridlm.inference.sampling import SamplingParams
from hybridlm.inference.text import stream_text
from hybridlm.run import LoadedRun, load_run_on_device

Pair = tuple[list[int], list[int]]
"""(context ids, continuation ids)."""


def rolling_windows(ids: list[int], prefix_id: int, context: int) -> list[Pair]:
    """lm-eval's rolling windows over a token list, as (context, continuation) pairs whose
    continuations tile `ids` exactly once. The first block is predicted from the prefix token."""
    if not ids:
        return []
    first = min(context, len(ids))
    pairs = [([prefix_id], ids[:first])]
    done = first
    while done < len(ids):
        end = min(done + context, len(ids))
        pairs.append((ids[end - context - 1 : done], ids[done:end]))
        done = end
    return pairs


class Scorer:
    """Log-likelihoods and greedy generations of one loaded run (model + tokenizer)."""

    def __init__(self, run: LoadedRun, batch_size: int = 16, dtype: str = "fp32") -> None:
        if batch_size <= 0:
            raise UserError(f"batch size must be > 0 (got {batch_size})")
        self.run = run
        self.model = run.model
        self.tokenizer = run.tokenizer
        self.batch_size = batch_size
        self.dtype = dtype
        self.context = run.model.cfg.max_seq_len
        self.prefix_id = run.tokenizer.eos_id

    @classmethod
    def from_path(cls, path: Path, batch_size: int = 16, dtype: str = "auto") -> Scorer:
        """Load a run for scoring on the default device; dtype "auto" is bf16 where the hardware
        runs it natively (weights cast once, as the generation engine expects)."""
        run, resolved = load_run_on_device(Path(path), dtype)
        return cls(run, batch_size=batch_size, dtype=resolved)

    def encode_pair(self, context: str, continuation: str) -> Pair:
        """Context and continuation ids, split the way HFLM splits them (module docstring)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        context_ids = [self.prefix_id, *self.tokenizer.encode(context)]
        whole = [self.prefix_id, *self.tokenizer.encode(context + continuation)]
        return context_ids, whole[len(context_ids) :]

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """Per (context, continuation): summed log-probability of the continuation's tokens, and
        whether greedy decoding from the context would produce exactly those tokens."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        """Whole-text log-likelihood of each text (every token scored once, rolling windows)."""
        windows = [rolling_windows(self.tokenizer.encode(t), self.prefix_id, self.context) for t in texts]
        scores = iter(self.loglikelihood_tokens([pair for text_windows in windows for pair in text_windows]))
        return [sum(next(scores)[0] for _ in text_windows) for text_windows in windows]

    def loglikelihood_tokens(self, pairs: list[Pair]) -> list[tuple[float, bool]]:
        """The batched core over token ids; results come back in request order. A continuation
        longer than the context is scored in context-sized pieces, each conditioned on the text
        before it (HFLM has no answer for this case)."""
        owners, rows = [], []
        for i, (context, continuation) in enumerate(pairs):
            for start in range(0, max(len(continuation), 1), self.context):
                owners.append(i)
                rows.append(self._row(context + continuation[:start], continuation[start : start + self.context]))
        order = sorted(range(len(rows)), key=lambda r: (-len(rows[r][0]), rows[r][0], rows[r][1]))
        totals, greedy = [0.0] * len(pairs), [True] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for r, (ll, is_greedy) in zip(batch, self._score_batch([rows[r] for r in batch])):
                totals[owners[r]] += ll
                greedy[owners[r]] = greedy[owners[r]] and is_greedy
        return list(zip(totals, greedy))

    def _row(self, context: list[int], continuation: list[int]) -> Pair:
        """(model input, continuation): the joined ids left-truncated to the context, minus the
        last token (nothing predicts from it)."""
        if not context:
            raise ValueError("a scoring request needs at least one context token (the prefix)")
        if not continuation:
            raise UserError("a continuation must be at least one token long")
        return (context + continuation)[-(self.context + 1) : -1], continuation

    @torch.no_grad()
    def _score_batch(self, rows: list[Pair]) -> list[tuple[float, bool]]:
        device = next(self.model.parameters()).device
        width = max(len(ids) for ids, _ in rows)
        ids_BT = torch.full((len(rows), width), self.tokenizer.special_ids["pad"], dtype=torch.long)
        for r, (ids, _) in enumerate(rows):
            ids_BT[r, : len(ids)] = torch.tensor(ids)
        with autocast(self.dtype, device):
            logits_BTV = self.model(ids_BT.to(device))
        results = []
        for r, (ids, continuation) in enumerate(rows):
            logp_CV = F.log_softmax(logits_BTV[r, len(ids) - len(continuation) : len(ids)].float(), dim=-1)
            target_C = torch.tensor(continuation, device=device)
            total = float(logp_CV.gather(1, target_C[:, None]).sum())
            results.append((total, bool((logp_CV.argmax(dim=-1) == target_C).all())))
        return results

    def generate_until(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        """Greedy continuation of each plain-text prompt, cut at the first stop string (dropped)
        or at eos."""
        prompt_ids = [[self.prefix_id, *self.tokenizer.encode(p)] for p in prompts]
        return self.generate_ids_until(prompt_ids, max_new_tokens, stop, self.tokenizer.eos_id)

    def generate_ids_until(
        self, prompt_ids: list[list[int]], max_new_tokens: int, stop: list[str], eos_id: int
    ) -> list[str]:
        """Greedy generation from token-id prompts (e.g. chat-rendered ones, whose role markers
        are ids, not text) with the inference engine; prompts keep their last
        context - max_new_tokens tokens, as HFLM does."""
        if not 0 < max_new_tokens < self.context:
            raise UserError(f"max new tokens must be in 1..{self.context - 1} (got {max_new_tokens})")
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
        keep = self.context - max_new_tokens
        texts = []
        for ids in prompt_ids:
            tokens = generate_ids(self.model, ids[-keep:], params, eos_id=eos_id)
            texts.append("".join(stream_text(self.tokenizer, tokens, tuple(stop))))
        return texts
