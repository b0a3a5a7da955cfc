"""`rlm-server view FILE.jsonl [-o report.html]`: one self-contained HTML page of a trajectory.

An RLM's answer is only as trustworthy as the code that produced it, so the page shows the
question, the answer (or the error), every iteration's reply, code and output, the sub-calls each
iteration made, and where the time and tokens went. It reads what `--log-dir` writes (the `rlm`
library's logger format plus our `query`, `request_id` and closing `result` line) and the
library's own files, and it is tolerant: unknown line types are skipped and malformed lines are
reported on the page, never a crash.

Everything in a trajectory is untrusted (the model wrote it), so every string reaches the page
through `html.escape`, never as markup; a Content-Security-Policy that only allows the page's own
script by hash is a second wall. The page needs no network and no build step: CSS, JS and the SVG
chart are inline.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

DISPLAY_LIMIT = 20_000  # chars shown of one string: the library's own logs are not truncated
OPEN_MAX_LINES = 14  # a text block longer than this starts collapsed
OPEN_MAX_CHARS = 1_500
OPEN_MAX_SUB_CALLS = 3  # a code block with more sub-calls lists them folded

# ---------------------------------------------------------------------------------------------
# Reading: a trajectory file into plain, typed records. Nothing here raises on odd data.


@dataclass(frozen=True)
class SubCall:
    """One `llm_query` made by the REPL code, as the library logged it."""

    model: str
    prompt: str
    response: str
    input_tokens: int | None
    output_tokens: int | None
    cost: float | None
    seconds: float | None
    error: str


@dataclass(frozen=True)
class ToolCall:
    """One host tool call the REPL code made (our --log-dir adds them): sizes, not contents."""

    name: str
    arguments_bytes: int | None
    result_bytes: int | None
    seconds: float | None
    error: str | None


@dataclass(frozen=True)
class CodeBlock:
    """One code block the root model wrote and the REPL ran."""

    code: str
    stdout: str
    stderr: str
    seconds: float | None
    locals: dict[str, str]
    calls: list[SubCall]


@dataclass(frozen=True)
class Iteration:
    """One turn: the root model's reply and the code blocks it ran."""

    number: int
    timestamp: str
    response: str
    blocks: list[CodeBlock]
    final_answer: str | None
    seconds: float | None
    prompt: list[tuple[str, str]]
    tools: list[ToolCall]

    @property
    def calls(self) -> list[SubCall]:
        return [call for block in self.blocks for call in block.calls]

    @property
    def sub_tokens(self) -> tuple[int, int]:
        """Sub-call tokens (in, out): the root call's own tokens are only known per request."""
        calls = self.calls
        return (
            sum(c.input_tokens or 0 for c in calls),
            sum(c.output_tokens or 0 for c in calls),
        )

    @property
    def sub_cost(self) -> float | None:
        costs = [c.cost for c in self.calls if c.cost is not None]
        return sum(costs) if costs else None

    @property
    def code_seconds(self) -> float:
        """Time in the REPL, sub-calls included (they run inside the code)."""
        return sum(b.seconds or 0.0 for b in self.blocks)

    @property
    def sub_seconds(self) -> float:
        return sum(c.seconds or 0.0 for c in self.calls)


@dataclass
class Trajectory:
    """A whole file: what ran, each iteration, how it ended, and what could not be read."""

    source: str
    metadata: dict[str, Any] | None = None
    iterations: list[Iteration] = field(default_factory=list)
    result: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def query(self) -> str | None:
        query = (self.metadata or {}).get("query")
        return None if query is None else _clip(_text(query))

    @property
    def answer(self) -> str | None:
        """The result's text; for files without a result line, the last final answer logged."""
        if self.result is not None and self.result.get("text") is not None:
            return _clip(_text(self.result["text"]))
        finals = [it.final_answer for it in self.iterations if it.final_answer is not None]
        return finals[-1] if finals else None

    @property
    def error(self) -> dict[str, Any] | None:
        return _dict((self.result or {}).get("error")) or None


def _clip(text: str, limit: int = DISPLAY_LIMIT) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[viewer: {len(text) - limit:,} more chars not shown]"


def _text(value: Any) -> str:
    """Any JSON value as text: strings as they are, anything else as compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _num(value: Any) -> float | None:
    """A finite number, else None: `json.loads` reads `1e999` as infinity and takes `NaN`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    number = _num(value)
    return None if number is None else int(number)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _sub_call(raw: Any) -> SubCall:
    """Tokens and cost are summed over the usage summary's models (normally just one)."""
    call = _dict(raw)
    models = _dict(_dict(call.get("usage_summary")).get("model_usage_summaries"))
    usages = [_dict(u) for u in models.values()]
    costs = [c for c in (_num(u.get("total_cost")) for u in usages) if c is not None]

    def total(key: str) -> int | None:
        values = [v for v in (_int(u.get(key)) for u in usages) if v is not None]
        return sum(values) if values else None

    model = _text(call.get("root_model")) or ", ".join(models) or "?"
    return SubCall(
        model=model,
        prompt=_clip(_text(call.get("prompt"))),
        response=_clip(_text(call.get("response"))),
        input_tokens=total("total_input_tokens"),
        output_tokens=total("total_output_tokens"),
        cost=sum(costs) if costs else None,
        seconds=_num(call.get("execution_time")),
        error=_clip(_text(call.get("error"))),
    )


def _code_block(raw: Any) -> CodeBlock:
    block = _dict(raw)
    result = _dict(block.get("result"))
    return CodeBlock(
        code=_clip(_text(block.get("code"))),
        stdout=_clip(_text(result.get("stdout"))),
        stderr=_clip(_text(result.get("stderr"))),
        seconds=_num(result.get("execution_time")),
        locals={str(k): _clip(_text(v), 400) for k, v in _dict(result.get("locals")).items()},
        calls=[_sub_call(c) for c in _list(result.get("rlm_calls"))],
    )


def _prompt(raw: Any) -> list[tuple[str, str]]:
    """The messages sent to the root model (our log leaves this empty; the library fills it)."""
    if isinstance(raw, str):
        return [("prompt", _clip(raw))]
    messages = [_dict(m) for m in _list(raw)]
    return [(_text(m.get("role")) or "?", _clip(_text(m.get("content")))) for m in messages]


def _tool_call(raw: Any) -> ToolCall:
    call = _dict(raw)
    error = call.get("error")
    return ToolCall(
        name=_clip(_text(call.get("name")), 200) or "?",
        arguments_bytes=_int(call.get("arguments_bytes")),
        result_bytes=_int(call.get("result_bytes")),
        seconds=_num(call.get("time_s")),
        error=None if error is None else _clip(_text(error)),
    )


def _iteration(raw: dict[str, Any], position: int) -> Iteration:
    final = raw.get("final_answer")
    return Iteration(
        number=_int(raw.get("iteration")) or position,
        timestamp=_text(raw.get("timestamp")),
        response=_clip(_text(raw.get("response"))),
        blocks=[_code_block(b) for b in _list(raw.get("code_blocks"))],
        final_answer=None if final is None else _clip(_text(final)),
        seconds=_num(raw.get("iteration_time")),
        prompt=_prompt(raw.get("prompt")),
        tools=[_tool_call(c) for c in _list(raw.get("tool_calls"))],
    )


def parse(lines: Iterable[str], source: str = "") -> Trajectory:
    """Reads JSONL lines; a line that is not a JSON object becomes a problem on the page."""
    trajectory = Trajectory(source=source)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            trajectory.problems.append(f"line {number}: not valid JSON ({error})")
            continue
        if not isinstance(record, dict):
            trajectory.problems.append(f"line {number}: not a JSON object")
            continue
        _take(trajectory, record, number)
    if trajectory.metadata is None:
        trajectory.problems.append("no metadata line: the model and settings are unknown")
    return trajectory


def _take(trajectory: Trajectory, record: dict[str, Any], number: int) -> None:
    kind = record.get("type")
    if kind == "metadata" and trajectory.metadata is None:
        trajectory.metadata = record
    elif kind == "iteration":
        iteration = _iteration(record, len(trajectory.iterations) + 1)
        previous = trajectory.iterations[-1].number if trajectory.iterations else 0
        if iteration.number <= previous:  # the library's logger restarts at 1 per completion
            trajectory.problems.append(
                f"line {number}: iteration numbers restart ({previous} then {iteration.number}):"
                " the file may hold more than one run"
            )
        trajectory.iterations.append(iteration)
    elif kind == "result" and trajectory.result is None:
        trajectory.result = record
    elif kind in ("metadata", "result"):
        trajectory.problems.append(f"line {number}: a second {kind} line, ignored")
    else:
        trajectory.skipped.append(f"line {number}: type {_text(kind)[:60]!r}")


def load(path: Path) -> Trajectory:
    """Reads a file line by line (invalid UTF-8 is replaced, not fatal)."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        return parse(lines, source=str(path))


# ---------------------------------------------------------------------------------------------
# Formatting numbers for people.


def _fmt_int(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _fmt_usd(cost: float | None) -> str:
    if cost is None:
        return "unknown"  # e.g. a model without a known price
    if cost == 0:
        return "$0"
    if abs(cost) >= 0.01:
        return f"${cost:.4f}"
    digits = 1 - math.floor(math.log10(abs(cost)))  # two significant digits, never 1e-05
    return f"${cost:.{digits}f}"


def _tokens(pair: tuple[int | None, int | None]) -> str:
    return f"{_fmt_int(pair[0])} in / {_fmt_int(pair[1])} out"


# ---------------------------------------------------------------------------------------------
# Rendering. Every string from the file goes through `escape`; nothing else builds markup.


def _block(kind: str, label: str, text: str, fold: bool = False) -> str:
    """A collapsible monospace block: open when short, closed with a one-line preview when long."""
    lines = text.count("\n") + 1
    short = lines <= OPEN_MAX_LINES and len(text) <= OPEN_MAX_CHARS and not fold
    first = text.strip().splitlines()[0] if text.strip() else ""
    preview = "" if short else f'<span class="preview">{escape(first[:90])}</span>'
    size = f"{lines:,} lines, {len(text):,} chars"
    return (
        f'<details class="blk {kind}"{" open" if short else ""}>'
        f'<summary><span class="label">{escape(label)}</span> <span class="muted">{size}</span>'
        f"{preview}</summary><pre>{escape(text)}</pre></details>"
    )


def _sub_call_html(index: int, call: SubCall, open_: bool) -> str:
    parts = [
        f"sub-call {index}",
        escape(call.model),
        _tokens((call.input_tokens, call.output_tokens)) + " tokens",
        _fmt_seconds(call.seconds),
        "cost unknown" if call.cost is None else _fmt_usd(call.cost),
    ]
    body = _block("prompt", "prompt", call.prompt) + _block("answer", "answer", call.response)
    if call.error:
        body += _block("stderr", "error", call.error)
    return (
        f'<details class="subcall"{" open" if open_ else ""}>'
        f"<summary>↳ {' · '.join(parts)}</summary>"
        f'<div class="subbody">{body}</div></details>'
    )


def _code_block_html(index: int, block: CodeBlock) -> str:
    parts = [_block("code", f"code block {index}", block.code)]
    if block.stdout:
        parts.append(_block("stdout", "stdout", block.stdout))
    if block.stderr:
        parts.append(_block("stderr", "stderr", block.stderr))
    if not block.stdout and not block.stderr:
        parts.append('<p class="muted small">no output</p>')
    if block.locals:
        names = "\n".join(f"{k} = {v}" for k, v in block.locals.items())
        parts.append(_block("locals", "variables", names, fold=True))  # secondary: folded
    open_ = len(block.calls) <= OPEN_MAX_SUB_CALLS
    parts.extend(_sub_call_html(i, c, open_) for i, c in enumerate(block.calls, start=1))
    timing = f"ran in {_fmt_seconds(block.seconds)}"
    return f'<div class="codeblock"><div class="muted small">{timing}</div>{"".join(parts)}</div>'


def _iteration_stats(it: Iteration) -> str:
    calls = it.calls
    stats = [
        _fmt_seconds(it.seconds),
        f"{len(it.blocks)} code block(s)",
        f"{len(calls)} sub-call(s)",
    ]
    if calls:
        stats.append(f"sub-call tokens {_tokens(it.sub_tokens)}")
        stats.append(f"sub-call cost {_fmt_usd(it.sub_cost)}")
    if it.tools:
        stats.append(f"{len(it.tools)} tool call(s)")
    return " · ".join(stats)


def _tools_html(tools: Sequence[ToolCall]) -> str:
    """The iteration's host tool calls, one row each: name, bytes in and out, time, error."""
    if not tools:
        return ""
    rows = "".join(
        f'<tr class="toolcall"><td><code>{escape(call.name)}</code></td>'
        f"<td>{_fmt_int(call.arguments_bytes)} B</td><td>{_fmt_int(call.result_bytes)} B</td>"
        f"<td>{_fmt_seconds(call.seconds)}</td>"
        f"<td>{'' if call.error is None else escape(call.error)}</td></tr>"
        for call in tools
    )
    return (
        '<table class="tools"><thead><tr><th>host tool</th><th>arguments</th><th>value</th>'
        f"<th>time</th><th>ToolError</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _iteration_html(position: int, it: Iteration) -> str:
    """`position` keeps element ids unique when a file's iteration numbers repeat."""
    final = ""
    if it.final_answer is not None:
        final = (
            '<div class="final"><span class="badge ok">final answer</span> '
            f"{escape(it.final_answer)}</div>"
        )
    prompt = ""
    if it.prompt:
        text = _clip("\n\n".join(f"[{role}]\n{content}" for role, content in it.prompt))
        prompt = _block("prompt", f"prompt to the root model ({len(it.prompt)} messages)", text)
    blocks = "".join(_code_block_html(i, b) for i, b in enumerate(it.blocks, start=1))
    return (
        f'<details class="iteration" id="iteration-{position}" data-iteration="{it.number}" open>'
        f'<summary><h3>Iteration {it.number} <span class="muted small">{escape(it.timestamp)}'
        f'</span></h3><div class="stats">{_iteration_stats(it)}</div></summary>{prompt}'
        f"{_block('reply', 'model reply', it.response)}{blocks}{_tools_html(it.tools)}{final}"
        "</details>"
    )


def _outcome_html(t: Trajectory) -> str:
    error, answer = t.error, t.answer
    if error:
        data = json.dumps(error.get("data"), indent=2, ensure_ascii=False, default=str)
        head = f"Error {escape(_text(error.get('code')))}: {escape(_text(error.get('message')))}"
        body = _block("stderr", "error data", data) if error.get("data") is not None else ""
        return f'<div class="outcome err" id="error"><h2>{head}</h2>{body}</div>'
    if answer is not None:
        answer_html = f'<div id="answer">{escape(answer)}</div>'
        return f'<div class="outcome ok"><h2>Answer</h2>{answer_html}</div>'
    return (
        '<div class="outcome none"><h2>No answer</h2><p>The file records no final answer.</p></div>'
    )


def _fact(name: str, value: str) -> str:
    return f"<div><dt>{escape(name)}</dt><dd>{escape(value)}</dd></div>"


def _elapsed(t: Trajectory) -> str:
    """The request's wall time; without a result line, the iterations' own times summed."""
    elapsed_ms = _num(_dict((t.result or {}).get("metadata")).get("elapsed_ms"))
    if elapsed_ms is not None:
        return _fmt_seconds(elapsed_ms / 1000)
    times = [it.seconds for it in t.iterations if it.seconds is not None]
    return f"{_fmt_seconds(sum(times))} in iterations" if times else "?"


def _facts_html(t: Trajectory) -> str:
    meta, result = t.metadata or {}, t.result or {}
    done, usage = _dict(result.get("metadata")), _dict(result.get("usage"))
    sub_tokens = (
        sum(it.sub_tokens[0] for it in t.iterations),
        sum(it.sub_tokens[1] for it in t.iterations),
    )
    max_iter = _text(meta.get("max_iterations")) or "?"
    facts = [
        ("request", _text(meta.get("request_id")) or "—"),
        ("root model", _text(done.get("model") or meta.get("root_model")) or "?"),
        ("backend", _text(done.get("backend") or meta.get("backend")) or "?"),
        ("iterations", f"{len(t.iterations)} of at most {max_iter}"),
        ("max depth", _text(meta.get("max_depth")) or "?"),
        ("environment", _text(meta.get("environment_type")) or "?"),
        ("started", _text(meta.get("timestamp")) or "?"),
        ("elapsed", _elapsed(t)),
        ("attempts", _text(done.get("attempts")) or "?"),
        ("sub-calls", f"{sum(len(it.calls) for it in t.iterations)}"),
        ("sub-call tokens", _tokens(sub_tokens)),
    ]
    if usage:
        totals = (_int(usage.get("input_tokens")), _int(usage.get("output_tokens")))
        facts.append(("request tokens", _tokens(totals)))
        facts.append(("model calls", _fmt_int(_int(usage.get("calls")))))
        facts.append(("request cost", _fmt_usd(_num(usage.get("cost_usd")))))
    return f'<dl class="facts">{"".join(_fact(n, v) for n, v in facts)}</dl>'


def _models_html(t: Trajectory) -> str:
    """Per-model totals from the result line: the only place the root model's tokens appear."""
    models = _dict(_dict((t.result or {}).get("usage")).get("models"))
    if not models:
        return ""
    rows = "".join(
        f"<tr><td>{escape(name)}</td><td>{_fmt_int(_int(_dict(m).get('calls')))}</td>"
        f"<td>{_fmt_int(_int(_dict(m).get('input_tokens')))}</td>"
        f"<td>{_fmt_int(_int(_dict(m).get('output_tokens')))}</td>"
        f"<td>{_fmt_usd(_num(_dict(m).get('cost_usd')))}</td></tr>"
        for name, m in models.items()
    )
    return (
        '<table class="models"><thead><tr><th>model</th><th>calls</th><th>input tokens</th>'
        f"<th>output tokens</th><th>cost</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _notices_html(t: Trajectory) -> str:
    notes: list[str] = [escape(p) for p in t.problems]
    if t.skipped:
        notes.append(
            escape(f"skipped {len(t.skipped)} line(s) of unknown type: ")
            + escape("; ".join(t.skipped[:10]))
        )
    if t.result is None:
        notes.append(
            "no result line: the request was stopped before it ended, or the file was written "
            "by the rlm library's own logger; the answer shown is the last one an iteration set"
        )
    if not notes:
        return ""
    items = "".join(f"<li>{n}</li>" for n in notes)
    return f'<div class="notices" id="notices"><h2>Notes on this file</h2><ul>{items}</ul></div>'


# ---------------------------------------------------------------------------------------------
# The chart: one row per iteration, time split three ways on the left, sub-call tokens right.

_TIME_PARTS = (("root model reply", "#6366f1"), ("code", "#14b8a6"), ("sub-calls", "#f59e0b"))
_TOKEN_PARTS = (("sub-call input", "#0ea5e9"), ("sub-call output", "#ec4899"))


def _time_split(it: Iteration) -> tuple[float, float, float]:
    """Why the split: the iteration's time is the root call, then the code (with its sub-calls)."""
    code = it.code_seconds
    sub = min(it.sub_seconds, code) if code else it.sub_seconds
    root = max((it.seconds or 0.0) - code, 0.0) if it.seconds is not None else 0.0
    return root, max(code - sub, 0.0), sub


def _bar(
    x: float, y: float, widths: Sequence[float], colors: Sequence[tuple[str, str]], tip: str
) -> str:
    parts, offset = [], x
    for width, (_, color) in zip(widths, colors, strict=True):
        if width > 0:
            parts.append(
                f'<rect x="{offset:.1f}" y="{y:.1f}" width="{max(width, 1):.1f}" height="14" '
                f'fill="{color}"><title>{escape(tip)}</title></rect>'
            )
        offset += width
    return "".join(parts)


def _legend(x: float, parts: Sequence[tuple[str, str]]) -> str:
    out = []
    for label, color in parts:
        out.append(f'<rect x="{x}" y="22" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{x + 14}" y="31" class="legend">{escape(label)}</text>')
        x += 14 + 7 * len(label) + 14
    return "".join(out)


_PANEL, _ROW, _TOP, _LEFT = 300, 22, 46, 52
_RIGHT = _LEFT + _PANEL + 110


def _chart_row(y: int, it: Iteration, time_scale: float, token_scale: float) -> str:
    """One iteration's two stacked bars, each with its total and a hover tooltip."""
    split, tokens = _time_split(it), it.sub_tokens
    total = "?" if it.seconds is None else _fmt_seconds(sum(split))
    tip = " / ".join(f"{n} {_fmt_seconds(v)}" for (n, _), v in zip(_TIME_PARTS, split, strict=True))
    token_tip = f"sub-calls: {tokens[0]:,} input, {tokens[1]:,} output tokens"
    return (
        f'<g class="row" data-iteration="{it.number}">'
        f'<text x="{_LEFT - 8}" y="{y + 11}" text-anchor="end">#{it.number}</text>'
        + _bar(_LEFT, y, [v * time_scale for v in split], _TIME_PARTS, tip)
        + f'<text x="{_LEFT + _PANEL + 6}" y="{y + 11}">{total}</text>'
        + _bar(_RIGHT, y, [v * token_scale for v in tokens], _TOKEN_PARTS, token_tip)
        + f'<text x="{_RIGHT + _PANEL + 6}" y="{y + 11}">{_fmt_int(sum(tokens))}</text></g>'
    )


def _chart_html(iterations: Sequence[Iteration]) -> str:
    """Bars share one scale per panel, so the longest iteration fills it."""
    if not iterations:
        return ""
    max_time = max(sum(_time_split(it)) for it in iterations) or 1.0
    max_tokens = max(sum(it.sub_tokens) for it in iterations) or 1
    rows = "".join(
        _chart_row(_TOP + i * _ROW, it, _PANEL / max_time, _PANEL / max_tokens)
        for i, it in enumerate(iterations)
    )
    width, height = 860, _TOP + len(iterations) * _ROW + 6
    return (
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>Time and sub-call tokens per iteration</title>"
        f'<text x="{_LEFT}" y="12" class="head">time per iteration</text>'
        f'<text x="{_RIGHT}" y="12" class="head">sub-call tokens per iteration</text>'
        f"{_legend(_LEFT, _TIME_PARTS)}{_legend(_RIGHT, _TOKEN_PARTS)}{rows}</svg>"
    )


# ---------------------------------------------------------------------------------------------
# The page.

_CSS = """
:root{--fg:#1e293b;--muted:#64748b;--line:#e2e8f0;--bg:#f8fafc;--card:#fff}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
 font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Liberation Sans",sans-serif}
main{max-width:1080px;margin:0 auto;padding:24px 28px 64px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:0 0 8px}h3{font-size:16px;margin:0}
.muted{color:var(--muted)}.small{font-size:12.5px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 18px;
 margin:14px 0}
.question{font-size:17px;white-space:pre-wrap;overflow-wrap:anywhere}
.outcome{border-radius:10px;padding:14px 18px;margin:14px 0;white-space:pre-wrap;
 overflow-wrap:anywhere}
.outcome.ok{background:#ecfdf5;border:1px solid #6ee7b7}
.outcome.err{background:#fef2f2;border:1px solid #fca5a5}
.outcome.none{background:#fffbeb;border:1px solid #fcd34d}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:8px 18px;margin:0}
.facts dt{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.facts dd{margin:0;overflow-wrap:anywhere}
table.models{border-collapse:collapse;margin-top:12px;font-size:13.5px}
.models th,.models td{border-bottom:1px solid var(--line);padding:3px 14px 3px 0;text-align:left}
.notices{background:#fffbeb;border:1px solid #fcd34d;border-radius:10px;padding:12px 18px}
.notices ul{margin:0;padding-left:20px;overflow-wrap:anywhere}
.chart{max-width:100%;height:auto;font:12px system-ui,sans-serif;fill:var(--fg)}
.chart .head{font-weight:600}.chart .legend{fill:var(--muted)}
.toolbar{display:flex;gap:8px;align-items:center;margin:22px 0 6px}
.toolbar h2{margin:0 auto 0 0}
button{font:inherit;font-size:13px;border:1px solid var(--line);background:var(--card);
 border-radius:6px;padding:3px 10px;cursor:pointer}
.timeline{border-left:3px solid #cbd5e1;margin-left:8px;padding-left:20px}
.iteration{position:relative;background:var(--card);border:1px solid var(--line);
 border-radius:10px;padding:12px 16px;margin:0 0 16px}
.iteration>summary{cursor:pointer;list-style:none}
.iteration>summary::-webkit-details-marker{display:none}
.iteration>summary h3::before{content:"\\25B8  ";color:var(--muted)}
.iteration[open]>summary h3::before{content:"\\25BE  "}
.iteration::before{content:"";position:absolute;left:-29px;top:16px;width:12px;height:12px;
 border-radius:50%;background:#6366f1;border:2px solid var(--bg)}
.stats{color:var(--muted);font-size:13px;margin:2px 0 8px}
details.blk{margin:6px 0;border:1px solid var(--line);border-radius:7px;background:#fbfdff}
details.blk>summary{cursor:pointer;padding:3px 10px;font-size:13px;white-space:nowrap;
 overflow:hidden;text-overflow:ellipsis}
.label{font-weight:600}
.preview{color:var(--muted);font-family:ui-monospace,"DejaVu Sans Mono",monospace;margin-left:8px}
details.blk pre{margin:0;padding:8px 12px;border-top:1px solid var(--line);max-height:480px;
 overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere;
 font:12.5px/1.45 ui-monospace,"DejaVu Sans Mono","Liberation Mono",monospace}
details.reply pre{font-family:system-ui,sans-serif;font-size:14px}
details.code pre{background:#0f172a;color:#e2e8f0}
details.stdout pre{background:#f8fafc}
details.stderr pre{background:#fef2f2;color:#991b1b}
details.answer pre{background:#f0fdf4}
.codeblock{border-left:3px solid #14b8a6;padding-left:12px;margin:10px 0}
.tools{border-collapse:collapse;margin:10px 0;font-size:13px}
.tools th,.tools td{border:1px solid #ddd;padding:2px 8px;text-align:left;vertical-align:top}
details.subcall{margin:8px 0 8px 14px;border:1px solid #fcd34d;border-radius:8px;background:#fffdf5}
details.subcall>summary{cursor:pointer;padding:4px 10px;font-size:13px}
.subbody{padding:0 10px 6px}
.final{margin-top:10px;padding:8px 12px;background:#ecfdf5;border-radius:7px;white-space:pre-wrap;
 overflow-wrap:anywhere}
.badge{font-size:11.5px;border-radius:999px;padding:1px 8px;font-weight:600}
.badge.ok{background:#10b981;color:#fff}.badge.err{background:#ef4444;color:#fff}
.badge.none{background:#f59e0b;color:#fff}
"""

# The only script: expand or collapse every block. Allowed by hash, so injected script can't run.
_JS = (
    "document.querySelectorAll('button[data-open]').forEach(function(b){"
    "b.addEventListener('click',function(){var open=b.dataset.open==='1';"
    "document.querySelectorAll('details').forEach(function(d){d.open=open;});});});"
)


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(_JS.encode()).digest()).decode()
    return (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
        "img-src data:; base-uri 'none'; form-action 'none'"
    )


def _status(t: Trajectory) -> str:
    if t.error or (t.result or {}).get("outcome") == "error":
        return '<span class="badge err">error</span>'
    if t.result is not None:
        return '<span class="badge ok">success</span>'
    if t.answer is not None:  # the library's own files end without our result line
        return '<span class="badge none">no result line</span>'
    return '<span class="badge none">unfinished</span>'


def render(t: Trajectory) -> str:
    """The whole page as one string."""
    query = t.query
    question = (
        f'<div class="question" id="question">{escape(query)}</div>'
        if query is not None
        else '<p class="muted" id="question">The file does not record the question.</p>'
    )
    timeline = "".join(_iteration_html(i, it) for i, it in enumerate(t.iterations, 1)) or (
        '<p class="muted">No iterations were logged.</p>'
    )
    title = f"RLM trajectory: {query[:80]}" if query else "RLM trajectory"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{escape(_csp())}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{_CSS}</style></head>
<body><main>
<h1>What the model did {_status(t)}</h1>
<div class="muted small">{escape(Path(t.source).name)}</div>
{_notices_html(t)}
<div class="card"><h2>Question</h2>{question}</div>
{_outcome_html(t)}
<div class="card">{_facts_html(t)}{_models_html(t)}</div>
<div class="card"><h2>Where the time and tokens went</h2>{_chart_html(t.iterations)}
<p class="muted small">Per-iteration tokens and cost count the sub-calls only: the root
model's own tokens are known for the whole request (above), not per iteration.</p></div>
<div class="toolbar"><h2>Timeline</h2><button type="button" data-open="1">Expand all</button>
<button type="button" data-open="0">Collapse all</button></div>
<div class="timeline">{timeline}</div>
</main><script>{_JS}</script></body></html>
"""


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv: Sequence[str]) -> int:
    """`rlm-server view FILE.jsonl [-o report.html]`; prints the report's path."""
    parser = argparse.ArgumentParser(
        prog="rlm-server view",
        description="Write one self-contained HTML report of a trajectory (a --log-dir file).",
    )
    parser.add_argument("file", type=Path, help="a trajectory, one JSON object per line")
    parser.add_argument("-o", "--output", type=Path, help="the report (default: FILE.html)")
    args = parser.parse_args(list(argv))
    source: Path = args.file
    output: Path = args.output or source.with_suffix(".html")
    if output.resolve() == source.resolve():
        parser.error("the report would overwrite the trajectory; name it with -o")
    try:
        page = render(load(source))
        output.write_text(page, encoding="utf-8")
    except OSError as error:
        print(f"rlm-server view: {error}", file=sys.stderr)
        return 1
    print(output)
    return 0
