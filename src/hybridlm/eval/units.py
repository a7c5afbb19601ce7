"""The efficiency table's fields and units, without torch: `eval efficiency` fills them, and
`eval report` (which only reads JSON) prints and charts them."""

from __future__ import annotations

FIELDS = {
    "params": "parameters",
    "flops_per_token": "FLOPs per token",
    "training_time": "training time",
    "tokens_seen": "tokens seen",
    "prefill_tokens_per_s": "prefill speed",
    "decode_tokens_per_s": "decode speed",
    "time_to_first_token": "time to first token",
    "peak_memory": "peak memory",
    "size_on_disk": "model size on disk",
    "energy_per_token": "energy per generated token",
}
"""Field keys in the method's table order, with the labels the tables print."""


def field(value: float | None, unit: str, method: str) -> dict:
    return {"value": value, "unit": unit, "method": method}


def display(value: float | None, unit: str) -> tuple[float | None, str]:
    """A value in the unit people read: bytes as MiB, sub-second times as ms."""
    if value is None:
        return None, unit
    if unit == "B":
        return value / 2**20, "MiB"
    if unit == "s" and value < 1:
        return value * 1000, "ms"
    return value, unit


def format_value(value: float | None, unit: str) -> str:
    shown, shown_unit = display(value, unit)
    if shown is None:
        return "—"
    if isinstance(shown, int):
        return f"{shown:,} {shown_unit}"
    return f"{shown:,.1f} {shown_unit}" if 100 <= abs(shown) < 1e9 else f"{shown:.4g} {shown_unit}"
