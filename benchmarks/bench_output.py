"""Shared output step of the benchmarks: JSON always, a PNG beside it when matplotlib is installed."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(out: str | Path, payload, draw=None, **json_kwargs) -> None:
    """Write ``payload`` as JSON to ``out``; ``draw(plt)`` returns a figure saved as ``out`` .png."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, **json_kwargs))
    if draw is None:
        print(f"wrote {out}")
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {out} (matplotlib is not installed: pip install -e .[bench] for the plot)")
        return
    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def table_cell(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters for a Markdown table cell: pipes and square brackets
    escaped (a crash reason such as ``[c10d] ...`` would otherwise read as a link reference)."""
    return text[:limit].replace("|", "\\|").replace("[", "\\[").replace("]", "\\]").replace("\n", " ")


def bandwidth_bytes_per_second(text: str) -> float:
    """Bytes per second of a tc rate such as ``1gbit`` or ``100mbit``."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for unit, scale in units.items():
        if text.lower().endswith(unit):
            return float(text[: -len(unit)]) * scale / 8
    raise ValueError(f"bandwidth must look like 1gbit / 100mbit, got {text!r}")
