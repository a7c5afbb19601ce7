"""Write a quantized copy of a finished run as a run directory of its own.

The new directory has the source's config.json plus a `quantization` section (kind, group size,
skipped patterns, the layers quantized, the source run and its weights' sha256), its tokenizer,
the quantized model.safetensors (codes and scales, see model/converters/quant.py), a lineage.json
pointing at the source and a manifest, so `generate`, `eval`, `serve` and `export` open it like
any run. It appears complete or not at all.
"""

from __future__ import annotations

import copy
from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_json, read_json
from hybridlm.interop.hf_export import check_empty_out, staged_dir
from hybridlm.model.converters.lora import has_lora
from hybridlm.model.converters.quant import QuantSpec, chosen_layers, quantize_linears, round_embeddings_to_bf16
from hybridlm.quantize.quality import compare_models, text_windows
from hybridlm.run import LoadedRun, load_run, save_final, weights_sha256

QUALITY_FILE = "quantization_quality.json"


def source_run(run_path: Path) -> LoadedRun:
    """The run to quantize, refused when it is quantized already or carries LoRA adapters."""
    run = load_run(Path(run_path))
    if quantized := run.config.get("quantization"):
        raise UserError(f"{run_path} is already quantized ({quantized['to']}); quantize the run it came from, "
                        f"{quantized['source']}")
    if has_lora(run.model):
        raise UserError(f"{run_path} is a LoRA run; `hybridlm lora merge` it first and quantize the merged run")
    return run


def quantize_run(run_path: Path, spec: QuantSpec, out: Path, *, data: Path | None = None,
                 tokens: int = 16384) -> dict:
    """Quantize the run at `run_path` into the new directory `out`; with `data` (a text file), also
    measure the quality against the source and keep it in the run as quantization_quality.json."""
    out = Path(out)
    check_empty_out(out)
    run = source_run(run_path)
    layers = chosen_layers(run.model, spec)
    windows = text_windows(run.tokenizer, data, run.model.cfg.max_seq_len, tokens) if data else None
    reference = copy.deepcopy(run.model) if windows else None
    model = quantize_linears(run.model, layers, spec.to, spec.group_size)
    round_embeddings_to_bf16(model)
    config = {**run.config, "quantization": {**spec.to_dict(), "layers": layers, "source": str(run.path.resolve()),
                                             "source_weights_sha256": weights_sha256(run.path)}}
    quality = compare_models(reference, model, windows) if windows else None
    lineage_path = run.path / "lineage.json"
    lineage = read_json(lineage_path, "lineage") if lineage_path.is_file() else {}
    with staged_dir(out) as tmp:
        atomic_write_json(tmp / "config.json", config)
        run.tokenizer.save(tmp / "tokenizer.json")
        atomic_write_json(tmp / "lineage.json", {**lineage, "quantized_from": {
            "run": str(run.path.resolve()), "weights_sha256": config["quantization"]["source_weights_sha256"]}})
        if quality:
            atomic_write_json(tmp / QUALITY_FILE, {"data": str(data), **quality})
        save_final(tmp, model)
    source_bytes = (run.path / "model.safetensors").stat().st_size
    quantized_bytes = (out / "model.safetensors").stat().st_size
    return {"run": str(run.path), "out": str(out), **spec.to_dict(), "layers": len(layers),
            "source_bytes": source_bytes, "bytes": quantized_bytes, "size_ratio": quantized_bytes / source_bytes,
            "quality": quality}
