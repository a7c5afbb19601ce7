"""`hybridlm quantize --sensitivity`: quantize one layer at a time and rank the layers by the KL
divergence that alone causes, so --skip can be chosen from data rather than guessed."""

from __future__ import annotations

import copy
from pathlib import Path

from hybridlm.model.converters.quant import QuantSpec, chosen_layers, quantize_linears
from hybridlm.quantize.quality import compare_models, text_windows
from hybridlm.quantize.writer import source_run


def layer_sensitivity(run_path: Path, spec: QuantSpec, data: Path, tokens: int = 8192) -> dict:
    """Per layer (of those `spec` would quantize): the quality figures with only it quantized,
    most damaging first."""
    run = source_run(run_path)
    windows = text_windows(run.tokenizer, data, run.model.cfg.max_seq_len, tokens)
    rows = []
    for name in chosen_layers(run.model, spec):
        candidate = quantize_linears(copy.deepcopy(run.model), [name], spec.to, spec.group_size)
        rows.append({"layer": name, **compare_models(run.model, candidate, windows)})
    rows.sort(key=lambda row: row["mean_kl"], reverse=True)
    return {"run": str(run.path), **spec.to_dict(), "data": str(data), "layers": rows}
