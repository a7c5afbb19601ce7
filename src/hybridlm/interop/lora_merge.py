"""`hybridlm lora merge`: a LoRA run folded into a plain run directory (its adapters added into the
base weights), which decodes at the base model's speed and loads anywhere a run does."""

from __future__ import annotations

from pathlib import Path

from hybridlm.errors import UserError
from hybridlm.fileio import atomic_write_json, read_json
from hybridlm.interop.hf_export import check_empty_out, staged_dir
from hybridlm.model.converters.lora import has_lora, merged_model
from hybridlm.run import load_run, save_final, weights_sha256


def merge_lora_run(run_dir: Path, out: Path) -> dict:
    run = load_run(Path(run_dir))
    if not has_lora(run.model):
        raise UserError(f"{run_dir} has no LoRA adapters (lora.r = 0); it is already a plain run")
    check_empty_out(Path(out))
    merged = merged_model(run.model)
    lineage_path = Path(run_dir) / "lineage.json"
    lineage = read_json(lineage_path, "lineage") if lineage_path.is_file() else {}
    with staged_dir(Path(out)) as tmp:
        atomic_write_json(tmp / "config.json", {**run.config, "lora": {"r": 0}})
        run.tokenizer.save(tmp / "tokenizer.json")
        atomic_write_json(tmp / "lineage.json", {**lineage, "merged_from": {
            "lora_run": str(run_dir), "lora_weights_sha256": weights_sha256(Path(run_dir))}})
        save_final(tmp, merged)
    return {"run_dir": str(out), "merged_from": str(run_dir), "base": run.config["train"]["init_from"]}
