"""RoBERTa-style dynamic masking for masked language modelling.

Masks are drawn when a batch is built, not stored with the data, so a sequence seen again gets a
new pattern: the caller seeds the generator per (seed, row, step), which keeps every pattern
reproducible on resume while no two visits of a row share one.
"""

from __future__ import annotations

import torch

from hybridlm.model.loss import IGNORE_INDEX

MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the selected tokens; the remaining 0.1 stay unchanged


def mask_tokens(
    ids_BT: torch.Tensor,
    generator: torch.Generator,
    *,
    mask_id: int,
    vocab_size: int,
    never_mask: list[int],
    prob: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_BT, targets_BT) for one masked-LM batch.

    Each token that is neither in `never_mask` (padding, other special ids) nor `mask_id` is
    selected with probability `prob`; of the selected, 80% become `mask_id`, 10% a token drawn
    uniformly from the ordinary ids (never a special one, so the model is not taught to emit
    them), 10% stay as they are (so the model cannot assume an unmasked token is correct).
    Targets hold the original ids at selected positions and IGNORE_INDEX elsewhere.

    `generator` (on the device of `ids_BT`) should be seeded per (seed, row, step): each visit of
    a sequence then gets a new pattern, and a resumed run draws the same ones.
    """
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"masking probability must be in (0, 1] (got {prob})")
    device = ids_BT.device
    special = torch.tensor(sorted({*never_mask, mask_id}), dtype=ids_BT.dtype, device=device)
    ordinary = torch.arange(vocab_size, dtype=ids_BT.dtype, device=device)
    ordinary = ordinary[~torch.isin(ordinary, special)]
    if ordinary.numel() == 0:
        raise ValueError("every id of the vocabulary is special: there is nothing to draw random tokens from")
    drawn = torch.rand(ids_BT.shape, generator=generator, device=device) < prob
    selected = drawn & ~torch.isin(ids_BT, special)
    action = torch.rand(ids_BT.shape, generator=generator, device=device)
    random_ids = ordinary[torch.randint(ordinary.numel(), ids_BT.shape, generator=generator, device=device)]
    inputs_BT = torch.where(selected & (action < MASK_SHARE), mask_id, ids_BT)
    to_random = selected & (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE)
    inputs_BT = torch.where(to_random, random_ids, inputs_BT)
    targets_BT = torch.where(selected, ids_BT, IGNORE_INDEX)
    return inputs_BT, targets_BT
