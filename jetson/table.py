#!/usr/bin/env python3
"""One comparison table from the JSON files jetson/bench.sh leaves in its output folder.

    python3 jetson/table.py out/   # prints Markdown, also written to out/summary.md

Per precision: images/s of the original and the converted engine (each timed alone),
the speed-up measured interleaved (`bench --compare`), and images/s per watt. Python 3.8.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

PRECISIONS = ("fp32", "fp16", "int8", "dla-fp16", "dla-int8")
HEADER = (
    "| precision | original img/s | converted img/s | speed-up (interleaved) "
    "| original img/s/W | converted img/s/W |"
)


def _load(path: Path) -> Optional[Dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else None


def _number(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def row(folder: Path, precision: str) -> Optional[str]:
    """The table row of one precision, or None when bench.sh skipped it."""
    models = ("original", "converted")
    alone = [_load(folder / f"{m}.{precision}.bench.json") for m in models]
    power = [_load(folder / f"{m}.{precision}.power.json") for m in models]
    compare = _load(folder / f"{precision}.compare.json")
    if compare is None and not any(alone):
        return None
    rates = [(b or {}).get("throughput_images_per_s") for b in alone]
    per_watt = [(p or {}).get("images_per_s_per_w") for p in power]
    cells = [
        precision,
        _number(rates[0]),
        _number(rates[1]),
        "-" if compare is None else f"{compare['throughput_ratio']:.2f}x",
        _number(per_watt[0], 2),
        _number(per_watt[1], 2),
    ]
    return "| " + " | ".join(cells) + " |"


def table(folder: Path) -> List[str]:
    rows = [r for r in (row(folder, p) for p in PRECISIONS) if r is not None]
    return [HEADER, "|" + "---|" * 6, *rows]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not Path(args[0]).is_dir():
        print("usage: python3 jetson/table.py OUTPUT_FOLDER", file=sys.stderr)
        return 2
    lines = table(Path(args[0]))
    if len(lines) == 2:
        print(f"table.py: no results in {args[0]}", file=sys.stderr)
        return 2
    text = "\n".join(lines) + "\n"
    (Path(args[0]) / "summary.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
