"""Heads grouped by how alike their attention is: Jensen-Shannon distances between heads on the
same text, average-linkage clusters, and a 2-D classical-MDS embedding for the plot.

Heads of different layers have different global-slot counts, so each attention row is first
folded onto a common support: one bucket for all global slots, then the positions. The distance
between two heads is the square root of the mean, over queries, of the base-2 Jensen-Shannon
divergence of their rows (a metric in [0, 1]).
"""

from __future__ import annotations

import numpy as np
import torch

from hybridlm.analysis.attention_maps import LayerMap


def folded_rows(layer_map: LayerMap) -> torch.Tensor:
    """(heads, T, 1 + T): the global slots' total, then the positions."""
    probs = layer_map.probs_HTK
    return torch.cat([probs[:, :, : layer_map.n_global].sum(-1, keepdim=True), probs[:, :, layer_map.n_global :]], -1)


def js_distances(rows_NTK: torch.Tensor) -> np.ndarray:
    """(N, N) Jensen-Shannon distances between N heads' rows (queries after the first)."""
    rows = rows_NTK[:, 1:].double()
    logs = rows.clamp(min=1e-300).log2()
    n = rows.shape[0]
    distances = np.zeros((n, n))
    for a in range(n):
        mixture = 0.5 * (rows[a][None] + rows)
        log_mixture = mixture.clamp(min=1e-300).log2()
        kl_a = (rows[a][None] * (logs[a][None] - log_mixture)).sum(-1)
        kl_b = (rows * (logs - log_mixture)).sum(-1)
        divergence = (0.5 * (kl_a + kl_b)).mean(-1).clamp(min=0.0)
        distances[a] = divergence.sqrt().numpy()
    return np.minimum(distances, distances.T)


def average_linkage(distances: np.ndarray, n_clusters: int) -> list[int]:
    """Agglomerative clustering (merge the two clusters with the least mean distance) down to
    n_clusters; labels numbered by first appearance."""
    clusters = [[i] for i in range(len(distances))]
    while len(clusters) > max(1, n_clusters):
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                mean = distances[np.ix_(clusters[a], clusters[b])].mean()
                if best is None or mean < best[0]:
                    best = (mean, a, b)
        _, a, b = best
        clusters[a] += clusters.pop(b)
    label = {i: c for c, members in enumerate(sorted(clusters, key=min)) for i in members}
    return [label[i] for i in range(len(distances))]


def mds_2d(distances: np.ndarray) -> np.ndarray:
    """(N, 2) coordinates whose Euclidean distances approximate `distances` (classical MDS)."""
    n = len(distances)
    centring = np.eye(n) - 1.0 / n
    gram = -0.5 * centring @ (distances**2) @ centring
    values, vectors = np.linalg.eigh(gram)
    top = np.argsort(values)[::-1][:2]
    return vectors[:, top] * np.sqrt(np.clip(values[top], 0.0, None))
