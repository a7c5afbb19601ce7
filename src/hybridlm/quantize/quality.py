"""How far a quantized model's next-token distributions are from the original's, reported as
llama.cpp's perplexity tool does: perplexity of both, its change, the mean KL divergence
KL(original || quantized) and the share of positions whose top token is unchanged.

Text is cut into consecutive windows of `context` tokens and, as llama.cpp does, only each
window's second half is scored, so every scored token has at least context / 2 of history.
Both models run in fp32 activations here, so the figures measure the weights' quantization alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm.errors import UserError
from hybridlm.tokenizer import TextTokenizer


def text_windows(tokenizer: TextTokenizer, path: Path, context: int, max_tokens: int) -> list[torch.Tensor]:
    """Consecutive (context + 1)-token windows of the file's tokens (inputs and the next token),
    at most `max_tokens` tokens in all."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data {path} is not a file; give a text file such as wikitext-2/test.txt")
    ids = torch.tensor(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")))[:max_tokens + 1]
    count = (len(ids) - 1) // context
    if count < 1:
        raise UserError(f"--data {path} has {len(ids)} tokens; it needs more than the context of {context}")
    return [ids[i * context : (i + 1) * context + 1] for i in range(count)]


@torch.no_grad()
def _scored_log_probs(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities (n, vocab) at the window's second half."""
    inputs = window[None, :-1].to(model.tok_emb.weight.device)
    logits = model(inputs)[0].float()
    return F.log_softmax(logits[logits.shape[0] // 2 :], dim=-1).cpu()


def compare_models(reference: nn.Module, candidate: nn.Module, windows: list[torch.Tensor]) -> dict:
    """Perplexities, KL and top-1 agreement of `candidate` against `reference` on the windows."""
    nll_ref = nll_cand = kl = same_top = 0.0
    count = 0
    for window in windows:
        ref, cand = _scored_log_probs(reference, window), _scored_log_probs(candidate, window)
        targets = window[1 + (window.shape[0] - 1) // 2 :]
        nll_ref -= float(ref.gather(1, targets[:, None]).sum())
        nll_cand -= float(cand.gather(1, targets[:, None]).sum())
        kl += float((ref.exp() * (ref - cand)).sum())
        same_top += float((ref.argmax(-1) == cand.argmax(-1)).sum())
        count += ref.shape[0]
    ppl_ref, ppl_cand = math.exp(nll_ref / count), math.exp(nll_cand / count)
    return {"tokens_scored": count, "ppl_reference": ppl_ref, "ppl": ppl_cand, "delta_ppl": ppl_cand - ppl_ref,
            "delta_ppl_percent": 100 * (ppl_cand / ppl_ref - 1), "mean_kl": kl / count, "same_top_token": same_top / count}
