"""The lines `hybridlm quantize` prints."""

from __future__ import annotations


def _quality_line(quality: dict) -> str:
    return (f"ppl {quality['ppl_reference']:.3f} -> {quality['ppl']:.3f} ({quality['delta_ppl_percent']:+.2f}%), "
            f"mean KL {quality['mean_kl']:.3g}, same top token {100 * quality['same_top_token']:.2f}% "
            f"({quality['tokens_scored']} tokens)")


def format_summary(result: dict) -> str:
    lines = [f"wrote {result['out']}: {result['layers']} layers {result['to']}, model.safetensors "
             f"{result['bytes'] / 1e6:.2f} MB ({100 * result['size_ratio']:.1f}% of {result['source_bytes'] / 1e6:.2f} MB)"]
    if result["quality"]:
        lines.append(_quality_line(result["quality"]))
    return "\n".join(lines)


def format_sensitivity(result: dict) -> str:
    lines = [f"{result['to']} one layer at a time on {result['data']}, most sensitive first:"]
    width = max(len(row["layer"]) for row in result["layers"])
    for row in result["layers"]:
        lines.append(f"  {row['layer']:<{width}}  {_quality_line(row)}")
    return "\n".join(lines)
