"""RoBERTa dynamic masking (selection rate, 80/10/10 split, special ids) and masked-token accuracy."""

from __future__ import annotations

import pytest
import torch

from hybridlm.config import preset
from hybridlm.data.masking import mask_tokens
from hybridlm.train.validation import masked_accuracy
from hybridlm.model import HybridLM
from hybridlm.model.loss import IGNORE_INDEX

VOCAB, PAD, BOS, EOS, MASK = 1000, 0, 1, 2, 3
NEVER = [PAD, BOS, EOS]


def _ids(rows: int = 100, cols: int = 2000, seed: int = 0) -> torch.Tensor:
    """~200k tokens (special ids among them at random), bos/eos in every row, a padded tail."""
    ids = torch.randint(0, VOCAB, (rows, cols), generator=torch.Generator().manual_seed(seed))
    ids[:, 0], ids[:, cols // 2] = BOS, EOS
    ids[:, cols - cols // 20 :] = PAD
    return ids


def _mask(ids: torch.Tensor, seed: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    fields = {"mask_id": MASK, "vocab_size": VOCAB, "never_mask": NEVER} | kw
    return mask_tokens(ids, torch.Generator().manual_seed(seed), **fields)


def test_selection_rate_and_80_10_10_split():
    ids = _ids()
    inputs, targets = _mask(ids, seed=1)
    maskable = ~torch.isin(ids, torch.tensor([*NEVER, MASK]))
    selected = targets != IGNORE_INDEX
    assert abs(selected.sum() / maskable.sum() - 0.15) < 0.005
    n_sel = selected.sum()
    masked = (selected & (inputs == MASK)).sum() / n_sel
    replaced = (selected & (inputs != MASK) & (inputs != ids)).sum() / n_sel
    unchanged = (selected & (inputs == ids)).sum() / n_sel  # includes the rare random draw of the same id
    assert abs(masked - 0.8) < 0.01 and abs(replaced - 0.1) < 0.01 and abs(unchanged - 0.1) < 0.01


def test_special_ids_are_never_selected_and_targets_mark_exactly_the_selection():
    ids = _ids()
    inputs, targets = _mask(ids, seed=2)
    special = torch.isin(ids, torch.tensor(NEVER))
    assert (targets[special] == IGNORE_INDEX).all() and torch.equal(inputs[special], ids[special])
    selected = targets != IGNORE_INDEX
    assert torch.equal(targets[selected], ids[selected])  # the original ids where selected
    assert torch.equal(inputs[~selected], ids[~selected])  # nothing changes where not selected


def test_random_replacements_are_never_special():
    """A vocabulary that is mostly special ids: random draws may only be the two ordinary ones."""
    ids = torch.randint(10, 12, (50, 400), generator=torch.Generator().manual_seed(3))
    inputs, _ = mask_tokens(
        ids, torch.Generator().manual_seed(4), mask_id=9, vocab_size=12, never_mask=list(range(9)), prob=0.5
    )
    changed = (inputs != ids) & (inputs != 9)
    assert changed.any()
    assert torch.isin(inputs[changed], torch.tensor([10, 11])).all()
    assert torch.isin(inputs, torch.tensor([9, 10, 11])).all()


def test_patterns_differ_across_seeds_and_repeat_for_one_seed():
    ids = _ids(rows=4, cols=512)
    first, again, other = _mask(ids, seed=5), _mask(ids, seed=5), _mask(ids, seed=6)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1]) and not torch.equal(first[0], other[0])


@pytest.mark.parametrize("prob", [0.0, -0.1, 1.5])
def test_probability_out_of_range_is_refused(prob):
    with pytest.raises(ValueError, match="probability"):
        _mask(_ids(rows=1, cols=8), seed=0, prob=prob)


def _tiny_model() -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(preset("tiny", vocab_size=VOCAB, max_seq_len=128)).eval()


def test_masked_accuracy_counts_every_target():
    model = _tiny_model()
    inputs, targets = _mask(torch.randint(4, VOCAB, (3, 96)), seed=7)
    correct, counted = masked_accuracy(model, inputs, targets)
    assert counted == int((targets != IGNORE_INDEX).sum()) > 0
    assert 0 <= correct <= counted


def test_masked_accuracy_on_known_answers():
    """Targets equal to the model's own bidirectional argmax are all correct; any other id is not."""
    model = _tiny_model()
    inputs = torch.randint(4, VOCAB, (2, 64), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        argmax = model(inputs, causal=False).argmax(-1)
    scored = torch.zeros_like(inputs, dtype=torch.bool)
    scored[:, ::3] = True
    targets = torch.where(scored, argmax, IGNORE_INDEX)
    assert masked_accuracy(model, inputs, targets) == (int(scored.sum()), int(scored.sum()))
    wrong = torch.where(scored, (argmax + 1) % VOCAB, IGNORE_INDEX)
    assert masked_accuracy(model, inputs, wrong) == (0, int(scored.sum()))
