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
