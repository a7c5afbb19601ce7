"""Per-head statistics of attention maps (LayerMap: heads x queries x [global slots, positions]).

Each statistic is a mean over query positions (the first query, which can only see itself and
the globals, left out where it would be trivially 1): attention to the previous token, to itself,
to the first token (the "sink"), mean distance to the keys attended, entropy in nats beside
log(visible keys) (the uniform head's entropy), and for sparse layers the mass on the local
window, the strided summary columns and the global slots. A head is *positional* when its argmax
sits at one fixed offset for >= 90% of queries; its induction score is measured on a separate
map of random tokens repeated (attention from each repeated token to the ones after its earlier
copies).
"""

from __future__ import annotations

from collections import Counter

import torch

from hybridlm.analysis.attention_maps import LayerMap

POSITIONAL_SHARE = 0.9
PREVIOUS_TOKEN_MIN = 0.5
SINK_MIN = 0.5
GLOBAL_MIN = 0.5
INDUCTION_MIN = 0.4
"""A head is called previous-token / sink / global / induction when its mean statistic reaches this."""


def _positions(layer_map: LayerMap) -> torch.Tensor:
    return layer_map.probs_HTK[:, :, layer_map.n_global :]


def _diagonal(probs_HTT: torch.Tensor, offset: int) -> torch.Tensor:
    """(heads, T - offset): each query's attention to the key `offset` positions back."""
    return torch.diagonal(probs_HTT, offset=-offset, dim1=1, dim2=2)


def previous_token(layer_map: LayerMap) -> torch.Tensor:
    return _diagonal(_positions(layer_map), 1).mean(1)


def self_attention(layer_map: LayerMap) -> torch.Tensor:
    return _diagonal(_positions(layer_map), 0)[:, 1:].mean(1)


def first_token(layer_map: LayerMap) -> torch.Tensor:
    return _positions(layer_map)[:, 1:, 0].mean(1)


def global_mass(layer_map: LayerMap) -> torch.Tensor:
    return layer_map.probs_HTK[:, 1:, : layer_map.n_global].sum(-1).mean(1)


def mean_distance(layer_map: LayerMap) -> torch.Tensor:
    """Mean of (query - key) under each query's attention over positions (global slots left out)."""
    probs = _positions(layer_map)
    length = probs.shape[1]
    distance = (torch.arange(length)[:, None] - torch.arange(length)[None, :]).clamp(min=0).float()
    mass = probs.sum(-1)
    per_query = (probs * distance).sum(-1) / mass.clamp(min=1e-12)
    return per_query[:, 1:].mean(1)


def entropy(layer_map: LayerMap) -> tuple[torch.Tensor, float]:
    """(mean entropy per head in nats, mean log of the visible keys: the uniform head's entropy)."""
    probs = layer_map.probs_HTK
    per_query = -(probs * probs.clamp(min=1e-30).log()).sum(-1)
    visible = (probs > 0).any(0).sum(-1).float()  # keys any head gives weight: the mask's row counts
    return per_query[:, 1:].mean(1), float(visible[1:].log().mean())


def positional_offset(layer_map: LayerMap) -> list[tuple[int | None, float]]:
    """Per head (the offset its argmax sits at most often, the share of queries at it); the offset is
    None unless the share reaches POSITIONAL_SHARE. A query whose argmax is a global slot has no offset."""
    probs = layer_map.probs_HTK[:, 1:]
    argmax = probs.argmax(-1) - layer_map.n_global
    queries = torch.arange(1, probs.shape[1] + 1)
    result = []
    for head in range(probs.shape[0]):
        offsets = [int(q - k) for q, k in zip(queries, argmax[head]) if k >= 0]
        if not offsets:
            result.append((None, 0.0))
            continue
        offset, count = Counter(offsets).most_common(1)[0]
        share = count / len(queries)
        result.append((offset if share >= POSITIONAL_SHARE else None, share))
    return result


def sparse_masses(layer_map: LayerMap) -> dict[str, torch.Tensor]:
    """Mass on the local window, on the strided columns before it, and on the global slots."""
    probs = _positions(layer_map)
    length = probs.shape[1]
    local = torch.arange(length)[None, :] > torch.arange(length)[:, None] - layer_map.spec.window
    return {"local": (probs * local).sum(-1)[:, 1:].mean(1), "strided": (probs * ~local).sum(-1)[:, 1:].mean(1),
            "global": global_mass(layer_map)}


def induction_score(layer_map: LayerMap, period: int) -> torch.Tensor:
    """On a map of random tokens repeated with this period: each query in a repeat, its attention
    to the positions just after its token's earlier occurrences (query - r * period + 1, r >= 1)."""
    probs = _positions(layer_map)
    length = probs.shape[1]
    if not 1 < period < length:
        raise ValueError(f"the period must be 2..{length - 1} (got {period})")
    query, key = torch.arange(length)[:, None], torch.arange(length)[None, :]
    successors = (key < query) & ((query - key + 1) % period == 0)
    return (probs * successors).sum(-1)[:, period:].mean(1)


def head_table(layer_map: LayerMap, induction_map: LayerMap, period: int) -> list[dict]:
    """One row of statistics per head of a layer."""
    entropies, uniform = entropy(layer_map)
    columns = {"previous_token": previous_token(layer_map), "self": self_attention(layer_map),
               "first_token": first_token(layer_map), "mean_distance": mean_distance(layer_map),
               "entropy": entropies, "induction": induction_score(induction_map, period)}
    if layer_map.spec.sparse:
        columns |= {f"{name}_mass": values for name, values in sparse_masses(layer_map).items()}
    rows = []
    for head, (offset, share) in enumerate(positional_offset(layer_map)):
        row = {"layer": layer_map.layer, "head": head, "kind": "sparse" if layer_map.spec.sparse else "dense",
               **{name: float(values[head]) for name, values in columns.items()},
               "uniform_entropy": uniform, "positional_offset": offset, "argmax_offset_share": share}
        row["roles"] = roles(row)
        rows.append(row)
    return rows


def roles(row: dict) -> list[str]:
    """The names a head's statistics earn it (several can apply)."""
    named = []
    if row["previous_token"] >= PREVIOUS_TOKEN_MIN:
        named.append("previous-token")
    if row["positional_offset"] is not None:
        named.append("positional")
    if row["first_token"] >= SINK_MIN:
        named.append("sink")
    if row.get("global_mass", 0.0) >= GLOBAL_MIN:
        named.append("global-slot")
    if row["induction"] >= INDUCTION_MIN:
        named.append("induction")
    return named
