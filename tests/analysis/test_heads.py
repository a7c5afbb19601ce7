"""`analyze heads`: each statistic by hand on attention patterns whose answer is known (a pure
previous-token head, a uniform head, an induction head made from query/key weights), the explicit
maps against the model's own attention output (dense, sparse with globals, GQA), the clustering
on known groups, and the command end to end with its bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from e2e.test_cli import hybridlm

from hybridlm.analysis import head_stats
from hybridlm.analysis.attention_maps import (
    LayerMap,
    _probabilities,
    layer_outputs,
    visible_mask,
)
from hybridlm.analysis.head_clusters import (
    average_linkage,
    folded_rows,
    js_distances,
    mds_2d,
)
from hybridlm.config import ModelConfig
from hybridlm.model import HybridLM
from hybridlm.model.layout import LayerSpec

T = 12
DENSE = LayerSpec(sparse=False)


def previous_token_head() -> torch.Tensor:
    probs = torch.zeros(T, T)
    probs[0, 0] = 1.0
    probs[torch.arange(1, T), torch.arange(T - 1)] = 1.0
    return probs


def uniform_head() -> torch.Tensor:
    return torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]


def test_a_pure_previous_token_head():
    layer = LayerMap(0, DENSE, previous_token_head()[None])
    assert head_stats.previous_token(layer).item() == 1.0 and head_stats.self_attention(layer).item() == 0.0
    assert head_stats.mean_distance(layer).item() == 1.0 and head_stats.entropy(layer)[0].item() == 0.0
    assert head_stats.positional_offset(layer) == [(1, 1.0)]
    row = head_stats.head_table(layer, layer, period=4)[0]
    assert row["roles"] == ["previous-token", "positional"]


def test_a_uniform_head_has_the_uniform_entropy():
    layer = LayerMap(0, DENSE, uniform_head()[None])
    entropies, uniform = head_stats.entropy(layer)
    queries = torch.arange(1, T)
    assert entropies.item() == pytest.approx(uniform) == pytest.approx(float(torch.log(queries + 1.0).mean()))
    assert head_stats.first_token(layer).item() == pytest.approx(float((1 / (queries + 1.0)).mean()))
    assert head_stats.previous_token(layer).item() == pytest.approx(float((1 / (queries + 1.0)).mean()))
    assert head_stats.mean_distance(layer).item() == pytest.approx(float((queries / 2.0).mean()))
    (offset, share), = head_stats.positional_offset(layer)
    assert offset is None and share < 0.9  # argmax ties go to the first key: offset i, different per query


def test_an_induction_head_made_from_weights():
    """Keys carry the previous token's identity (what a previous-token head writes), queries the
    current token's, scaled: each repeated token attends to the one after its earlier copy."""
    period, vocab = 5, 16
    tokens = torch.tensor([3, 9, 1, 14, 6] * 3)
    embed = torch.eye(vocab)
    q = 40.0 * embed[tokens]
    previous = torch.cat([torch.tensor([0]), tokens[:-1]])
    k = embed[previous] * (torch.arange(len(tokens)) > 0)[:, None]
    layer = LayerMap(0, DENSE, _probabilities(DENSE, q[None], k[None]))
    assert head_stats.induction_score(layer, period).item() == pytest.approx(1.0, abs=1e-3)
    assert head_stats.previous_token(layer).item() < 0.5


def test_sparse_masses_of_a_uniform_sparse_head():
    spec = LayerSpec(sparse=True, window=3, stride=4, n_global=2)
    visible = visible_mask(spec, T)
    rows = torch.cat([torch.ones(T, 2), visible.float()], 1)
    layer = LayerMap(0, spec, (rows / rows.sum(1, keepdim=True))[None])
    masses = head_stats.sparse_masses(layer)
    counts = rows.sum(1)[1:]
    local = torch.tensor([min(3, i + 1) for i in range(1, T)], dtype=torch.float)
    assert masses["global"].item() == pytest.approx(float((2 / counts).mean()))
    assert masses["local"].item() == pytest.approx(float((local / counts).mean()))
    assert masses["strided"].item() == pytest.approx(float(((counts - 2 - local) / counts).mean()))
    assert visible[11].nonzero().flatten().tolist() == [3, 7, 9, 10, 11]  # strided (j + 1) % 4 == 0, then the window


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_explicit_maps_reproduce_the_models_attention(n_kv_head):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=3, n_head=4, n_kv_head=n_kv_head, d_model=32, max_seq_len=64,
                      layer_pattern="DSS", window=5, stride=4, n_global=2)
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "global" in name:
                p.normal_()
    ids = torch.randint(64, (1, 40))
    for explicit, real in layer_outputs(model, ids):
        torch.testing.assert_close(explicit, real, atol=1e-5, rtol=1e-5)


def test_explicit_maps_reproduce_a_quantized_models_attention():
    """A quantized run has attention weights to analyse: its projections are QuantizedLinear modules,
    and the maps recomputed through them still give each layer's own output."""
    from hybridlm.model.converters.quant import quantizable_layers, quantize_linears

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=4, d_model=32, max_seq_len=64, layer_pattern="DS",
                      window=5, stride=4, n_global=2)
    model = quantize_linears(HybridLM(cfg).eval(), quantizable_layers(HybridLM(cfg)), "int4", 32)
    ids = torch.randint(64, (1, 40))
    for explicit, real in layer_outputs(model, ids):
        torch.testing.assert_close(explicit, real, atol=1e-5, rtol=1e-5)


def test_clusters_of_known_groups():
    prev, uniform = LayerMap(0, DENSE, previous_token_head()[None]), LayerMap(0, DENSE, uniform_head()[None])
    rows = torch.cat([folded_rows(prev), folded_rows(prev), folded_rows(uniform), folded_rows(uniform)])
    distances = js_distances(rows)
    assert distances[0, 1] == pytest.approx(0.0, abs=1e-7) and distances[2, 3] == pytest.approx(0.0, abs=1e-7)
    assert 0.3 < distances[0, 2] <= 1.0 and np.allclose(distances, distances.T)
    assert average_linkage(distances, 2) == [0, 0, 1, 1]
    disjoint = torch.zeros(2, 3, 4)
    disjoint[0, :, 0], disjoint[1, :, 1] = 1.0, 1.0
    assert js_distances(disjoint)[0, 1] == pytest.approx(1.0)  # no shared support: the maximum
    points = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [1.0, 1.0]])
    exact = np.linalg.norm(points[:, None] - points[None], axis=-1)
    embedded = mds_2d(exact)
    assert np.allclose(np.linalg.norm(embedded[:, None] - embedded[None], axis=-1), exact, atol=1e-8)



def test_analyze_heads_end_to_end(tiny_run, tmp_path):
    (tmp_path / "text.txt").write_text("\n\n".join(f"Paragraph {k}: the value of x{k} is {k * 7}." for k in range(60)))
    result = hybridlm("analyze", "heads", str(tiny_run), "--data", str(tmp_path / "text.txt"), "--tokens", "48",
                      "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    heads = document["heads"]
    pattern = document["layer_pattern"]
    per_layer = len(heads) // len(pattern)
    assert [h["kind"] for h in heads] == [{"S": "sparse", "D": "dense"}[c] for c in pattern for _ in range(per_layer)]
    assert document["induction_period"] == 12
    for head in heads:
        assert 0 <= head["entropy"] <= head["uniform_entropy"] + 1e-6 and 0 <= head["previous_token"] <= 1
        if head["kind"] == "sparse":
            total = head["local_mass"] + head["strided_mass"] + head["global_mass"]
            assert total == pytest.approx(1.0, abs=1e-5)
    assert sum(1 for _ in (tmp_path / "out").glob("attention_layer*.png")) == len(pattern)
    assert (tmp_path / "out" / "clusters.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "out" / "heads.json").read_text())["heads"] == heads
    assert "| layer | head | kind |" in (tmp_path / "out" / "heads.md").read_text()
    assert document["roles"]["previous-token"] == sum("previous-token" in h["roles"] for h in heads) / len(heads)


@pytest.mark.parametrize(("args", "words"), [
    (["--tokens", "3"], "--tokens must be 8.."), (["--data", "/nonexistent/file.txt"], "/nonexistent/file.txt"),
    (["--clusters", "0"], "--clusters must be >= 1"),
])
def test_bad_input_is_one_line(tiny_run, args, words):
    result = hybridlm("analyze", "heads", str(tiny_run), *args)
    assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_directory_that_is_not_a_run(tmp_path):
    result = hybridlm("analyze", "heads", str(tmp_path))
    assert result.returncode == 2 and "not a hybridlm run directory" in result.stderr
