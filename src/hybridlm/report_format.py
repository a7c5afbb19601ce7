"""The kit the reports share: PNG bytes from a matplotlib figure (Agg canvas, no display), series
colours, and the number / cell formatting of their markdown tables (`hybridlm report`,
`hybridlm eval report`)."""

from __future__ import annotations

import io
import math

MISSING = "—"


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()



def series_colour(index: int) -> str:
    return f"C{index % 10}"



def format_figure(value: object, digits: int = 4) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)



def escape_cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list[str]], left: int) -> list[str]:
    """Lines of a markdown table: the first `left` columns left-aligned, the rest right-aligned (figures)."""
    return ["| " + " | ".join(escape_cell(h) for h in header) + " |",
            "|" + "|".join(["---"] * left + ["---:"] * (len(header) - left)) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]



def json_safe(value: object) -> object:
    """NaN and infinity (a diverged loss) become null, so --json stays one valid JSON document."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value

