"""The evaluation's Markdown table and SVG plot, from its JSONL rows.

Scores are means over seeds on a 0-100 scale, as the RLM paper reports them. A row without a
score (the run the budget stopped) is left out; a failed run counts as 0. The plot is score
against input size, one panel per task, one line per method, like the paper's figure; it is
plain SVG text, so it needs no plotting library.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any, NamedTuple

from rlm_server.tools.eval.runner import METHODS
from rlm_server.tools.eval.tasks import TASKS

Json = dict[str, Any]
COLOURS = {"rlm": "#1f6fb4", "base": "#e07b18"}
DASHES = {"rlm": "", "base": ' stroke-dasharray="6 4"'}
PANEL_WIDTH, PANEL_HEIGHT, MARGIN = 280, 220, 44


class Cell(NamedTuple):
    """One method on one task and size, over its seeds."""

    runs: int
    score: float | None  # 0-100; None: no scored run
    cost_usd: float | None  # mean; None when any run's cost is unknown
    tokens: float
    calls: float
    seconds: float
    cut: int  # runs whose input was cut to the window
    failed: int


def size_label(size: int) -> str:
    for unit, name in ((1_000_000, "M"), (1_000, "k")):
        if size >= unit and size % (unit // 10) == 0:
            return f"{size / unit:g}{name}"
    return str(size)


def cells(rows: Iterable[Json]) -> dict[tuple[str, int, str], Cell]:
    grouped: dict[tuple[str, int, str], list[Json]] = {}
    for row in rows:
        grouped.setdefault((row["task"], row["size"], row["method"]), []).append(row)
    return {key: _cell(found) for key, found in grouped.items()}


def _cell(rows: list[Json]) -> Cell:
    scored = [row for row in rows if row["score"] is not None]
    costs = [row["cost_usd"] for row in rows]
    count = len(rows)
    return Cell(
        runs=len(scored),
        score=100 * sum(row["score"] for row in scored) / len(scored) if scored else None,
        cost_usd=None if None in costs else sum(costs) / count,
        tokens=sum(row["tokens"] for row in rows) / count,
        calls=sum(row["calls"] for row in rows) / count,
        seconds=sum(row["seconds"] for row in rows) / count,
        cut=sum(bool(row["cut"]) for row in scored),
        failed=sum(row["error"] is not None for row in scored),
    )


def _score(cell: Cell | None) -> str:
    if cell is None or cell.score is None:
        return "-"
    failed = f" ({cell.failed} failed)" if cell.failed else ""
    return f"{cell.score:.1f}{failed}"


def _cost(cell: Cell | None) -> str:
    if cell is None or cell.runs == 0:
        return "-"
    cost = "n/a" if cell.cost_usd is None else f"${cell.cost_usd:.4f}"
    return f"{cost}, {cell.tokens / 1000:.1f}k tok, {cell.calls:.1f} calls, {cell.seconds:.1f} s"


def _base_input(cell: Cell | None, window: int) -> str:
    if cell is None or cell.runs == 0:
        return "-"
    return f"cut to {size_label(window)} in {cell.cut}/{cell.runs}" if cell.cut else "whole"


def table(rows: Sequence[Json], header: Json) -> str:
    """The Markdown report: what ran, then one line per task and size."""
    found = cells(rows)
    keys = sorted({(task, size) for task, size, _ in found}, key=_order)
    lines = [
        f"rlm-server eval: backend {header['backend']}, model {header['model']}, "
        f"{header['seeds']} seed(s) per size, base model window {size_label(header['window'])} "
        "characters.",
        "",
        "Score: mean over seeds, 0-100 (numbers 0.75^|error|, pairs F1, else exact match). "
        "Cost: mean per run (n/a: no price known for the model), with tokens, calls and time.",
        "",
        "| task | size | RLM score | base score | RLM cost | base cost | base input |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, size in keys:
        rlm, base = found.get((task, size, "rlm")), found.get((task, size, "base"))
        lines.append(
            f"| {task} | {size_label(size)} | {_score(rlm)} | {_score(base)} | {_cost(rlm)} "
            f"| {_cost(base)} | {_base_input(base, header['window'])} |"
        )
    if header.get("stopped"):
        lines += ["", "Stopped early: the next run would have passed --budget-usd."]
    return "\n".join(lines) + "\n"


def _order(key: tuple[str, int]) -> tuple[int, int]:
    task, size = key
    return (TASKS.index(task) if task in TASKS else len(TASKS), size)


def plot(rows: Sequence[Json], header: Json) -> str:
    """Score against input size (log scale), one panel per task."""
    found = cells(rows)
    tasks = sorted({task for task, _, _ in found}, key=lambda task: _order((task, 0)))
    sizes = sorted({size for _, size, _ in found})
    width = max(1, len(tasks)) * PANEL_WIDTH
    height = PANEL_HEIGHT + 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="8" y="16" font-size="12">{escape(str(header["model"]))}: score (0-100) '
        "against input size (characters)</text>",
    ]
    for column, method in enumerate(METHODS):
        x = 8 + column * 110
        parts.append(
            f'<line x1="{x}" y1="{height - 10}" x2="{x + 24}" y2="{height - 10}" '
            f'stroke="{COLOURS[method]}" stroke-width="2"{DASHES[method]}/>'
            f'<text x="{x + 30}" y="{height - 6}">{"RLM" if method == "rlm" else "base model"}'
            "</text>"
        )
    for index, task in enumerate(tasks):
        parts += _panel(index * PANEL_WIDTH, task, sizes, found)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _panel(
    left: int, task: str, sizes: list[int], found: dict[tuple[str, int, str], Cell]
) -> list[str]:
    top, bottom = 48, PANEL_HEIGHT
    x0, x1 = left + MARGIN, left + PANEL_WIDTH - 16
    low, high = math.log10(sizes[0]), math.log10(sizes[-1])

    def x(size: int) -> float:
        if high == low:
            return (x0 + x1) / 2
        return x0 + (x1 - x0) * (math.log10(size) - low) / (high - low)

    def y(score: float) -> float:
        return bottom - (bottom - top) * score / 100

    parts = [
        f'<text x="{(x0 + x1) / 2}" y="{top - 6}" text-anchor="middle" font-weight="bold">'
        f"{escape(task)}</text>",
        f'<rect x="{x0}" y="{top}" width="{x1 - x0}" height="{bottom - top}" fill="none" '
        'stroke="#999"/>',
    ]
    for score in (0, 50, 100):
        parts.append(
            f'<text x="{x0 - 4}" y="{y(score) + 4}" text-anchor="end">{score}</text>'
            f'<line x1="{x0}" y1="{y(score)}" x2="{x1}" y2="{y(score)}" stroke="#eee"/>'
        )
    for size in sizes:
        parts.append(
            f'<text x="{x(size):.1f}" y="{bottom + 14}" text-anchor="middle">'
            f"{size_label(size)}</text>"
        )
    for method in METHODS:
        points = [
            (x(size), y(cell.score))
            for size in sizes
            if (cell := found.get((task, size, method))) is not None and cell.score is not None
        ]
        if not points:
            continue
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        colour = COLOURS[method]
        parts.append(
            f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"'
            f"{DASHES[method]}/>"
        )
        parts += [
            f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>' for px, py in points
        ]
    return parts
