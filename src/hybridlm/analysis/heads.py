"""`hybridlm analyze heads`: what each attention head of a run does, on real text.

Two sequences go through the model: the first `tokens` tokens of a text source (the built-in
corpus by default), for the per-head statistics, heatmaps and clusters; and random tokens (drawn
with `seed`, special tokens excluded) repeated REPEATS times, for the induction scores. Results:
a JSON document (per-head rows, the share of heads in each role, the clusters), and with `out`,
heads.md, one attention_layer<L>.png per layer and clusters.png.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hybridlm.analysis.attention_maps import LayerMap, attention_maps
from hybridlm.analysis.head_clusters import average_linkage, folded_rows, js_distances, mds_2d
from hybridlm.analysis.head_stats import head_table
from hybridlm.data.sources import iter_documents, resolve_source
from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from hybridlm.report_format import figure_png, format_figure, markdown_table, series_colour
from hybridlm.run import load_run

REPEATS = 4
HEATMAP_POSITIONS = 64
ROLES = ("previous-token", "positional", "sink", "global-slot", "induction")


def text_ids(tokenizer, spec: str, tokens: int) -> list[int]:
    """The first `tokens` tokens of the source's documents, joined by blank lines."""
    ids: list[int] = []
    for document in iter_documents(resolve_source(spec)):
        ids += tokenizer.encode(document + "\n\n")
        if len(ids) >= tokens:
            return ids[:tokens]
    raise UserError(f"{spec} holds only {len(ids)} tokens; give --tokens {len(ids)} or fewer, or more text")


def repeated_random_ids(tokenizer, tokens: int, seed: int) -> tuple[list[int], int]:
    """(random ordinary tokens repeated REPEATS times, filling `tokens`; the period)."""
    period = tokens // REPEATS
    ordinary = torch.tensor(sorted(set(range(tokenizer.vocab_size)) - set(tokenizer.special_ids.values())))
    draw = torch.randint(len(ordinary), (period,), generator=torch.Generator().manual_seed(seed))
    return ordinary[draw].tolist() * REPEATS, period


def analyze_heads(run_dir: Path, *, source: str = "stdlib-docs", tokens: int | None = None, seed: int = 0,
                  clusters: int = 4, out: Path | None = None) -> dict:
    run = load_run(Path(run_dir))
    context = run.model.cfg.max_seq_len
    tokens = min(512, context) if tokens is None else tokens
    if not 2 * REPEATS <= tokens <= context:
        raise UserError(f"--tokens must be {2 * REPEATS}..{context} (the model's context); got {tokens}")
    if clusters < 1:
        raise UserError(f"--clusters must be >= 1 (got {clusters})")
    model = run.model.eval()
    text = torch.tensor([text_ids(run.tokenizer, source, tokens)])
    random_ids, period = repeated_random_ids(run.tokenizer, tokens, seed)
    maps = attention_maps(model, text)
    induction_maps = attention_maps(model, torch.tensor([random_ids]))
    rows = [row for m, im in zip(maps, induction_maps) for row in head_table(m, im, period)]
    distances = js_distances(torch.cat([folded_rows(m) for m in maps]))
    labels = average_linkage(distances, min(clusters, len(rows)))
    for row, label in zip(rows, labels):
        row["cluster"] = label
    document = {"run": str(run_dir), "source": source, "tokens": tokens, "induction_period": period, "seed": seed,
                "layer_pattern": model.cfg.layer_pattern, "heads": rows,
                "roles": {role: sum(role in r["roles"] for r in rows) / len(rows) for role in ROLES}}
    if out is not None:
        document["files"] = write_outputs(Path(out), document, maps, mds_2d(distances))
    return document


COLUMNS = ("previous_token", "self", "first_token", "mean_distance", "entropy", "uniform_entropy", "induction",
           "local_mass", "strided_mass", "global_mass")


def heads_markdown(document: dict) -> str:
    header = ["layer", "head", "kind", *COLUMNS, "offset", "cluster", "roles"]
    rows = [[str(r["layer"]), str(r["head"]), r["kind"], *(format_figure(r.get(c), 3) for c in COLUMNS),
             format_figure(r["positional_offset"]), str(r["cluster"]), ", ".join(r["roles"]) or "-"]
            for r in document["heads"]]
    shares = ", ".join(f"{role} {share:.0%}" for role, share in document["roles"].items())
    return "\n".join([f"# Attention heads of {document['run']}", "",
                      f"{document['tokens']} tokens of {document['source']}; induction on random tokens with period "
                      f"{document['induction_period']} (seed {document['seed']}). Share of heads: {shares}.", "",
                      *markdown_table(header, rows, 3), ""])


def write_outputs(out: Path, document: dict, maps: list[LayerMap], coordinates) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "heads.json", "markdown": out / "heads.md"}
    for layer_map in maps:
        heads = layer_map.probs_HTK.shape[0]
        fig, axes = plt.subplots(1, heads, figsize=(2.2 * heads, 2.4), squeeze=False)
        n = min(HEATMAP_POSITIONS, layer_map.probs_HTK.shape[1])
        for head, ax in enumerate(axes[0]):
            ax.imshow(layer_map.probs_HTK[head, :n, : layer_map.n_global + n].numpy(), cmap="viridis", aspect="auto")
            ax.set_title(f"L{layer_map.layer} H{head}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
        fig.suptitle(f"layer {layer_map.layer} ({'sparse' if layer_map.spec.sparse else 'dense'}): first {n} queries; "
                     f"columns: {layer_map.n_global} global slots, then positions", fontsize=8)
        fig.tight_layout()
        files[f"layer{layer_map.layer}"] = out / f"attention_layer{layer_map.layer}.png"
        atomic_write_bytes(files[f"layer{layer_map.layer}"], figure_png(fig))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 5))
    for row, (x, y) in zip(document["heads"], coordinates):
        ax.scatter(x, y, color=series_colour(row["cluster"]), marker="o" if row["kind"] == "dense" else "^")
        ax.annotate(f"{row['layer']}.{row['head']}", (x, y), fontsize=7)
    ax.set_title("heads by Jensen-Shannon distance (classical MDS; colour: cluster, ^ sparse, o dense)", fontsize=8)
    files["clusters"] = out / "clusters.png"
    atomic_write_bytes(files["clusters"], figure_png(fig))
    plt.close(fig)
    document["files"] = {k: str(v) for k, v in files.items()}
    atomic_write_text(files["markdown"], heads_markdown(document))
    atomic_write_json(files["json"], document)
    return document["files"]
