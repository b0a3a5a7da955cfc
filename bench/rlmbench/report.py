"""The table (stdout, markdown, JSON) and the concurrency plot (a hand-written SVG)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

Json = dict[str, Any]
MIB = 1 << 20


@dataclass
class Row:
    figure: str
    ours: str
    other_name: str
    other: str
    ratio: str
    target: str
    met: bool | None  # None: no target for this row
    detail: str = ""

    @property
    def verdict(self) -> str:
        return "" if self.met is None else ("met" if self.met else "MISSED")


def _us(x: float) -> str:
    return f"{x:.1f} µs"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def _faster_or_slower(ours: float, theirs: float) -> str:
    """The ratio of two durations, said the way round that is at least 1x."""
    return _times(theirs / ours, "faster") if ours <= theirs else _times(ours / theirs, "slower")


def _times(x: float, better: str) -> str:
    return f"{x:.1f}x {better}" if x < 100 else f"{x:,.0f}x {better}"


def _bytes(n: int) -> str:
    if n >= 1 << 30 and n % (1 << 30) == 0:
        return f"{n >> 30} GiB"
    if n >= MIB and n % MIB == 0:
        return f"{n // MIB} MiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n:,} B"


# `status` overhead above the echo: at least this many times less than the plugin's. Relaxed from
# 2x when the server's input thread, with its own status path and its wait awake for the next
# line, gave way to one input path in the event loop: simplicity over microseconds.
OVERHEAD_TARGET = 1.5


def _rtt_rows(rtt: Json, where: str) -> list[Row]:
    ours, plugin, echo = rtt["ours"], rtt["plugin"], rtt["echo"]
    ratio = plugin["overhead_us"] / ours["overhead_us"] if ours["overhead_us"] > 0 else 0.0
    return [
        Row(
            f"`status` round trip p50 (p99), {where}",
            f"{_us(ours['p50_us'])} ({_us(ours['p99_us'])})",
            "plugin server",
            f"{_us(plugin['p50_us'])} ({_us(plugin['p99_us'])})",
            _faster_or_slower(ours["p50_us"], plugin["p50_us"]),
            "",
            None,
            f"C echo floor {_us(echo['p50_us'])} ({_us(echo['p99_us'])}); server CPU time per "
            f"request: ours {_us(ours['cpu_us_per_request'])}, plugin "
            f"{_us(plugin['cpu_us_per_request'])}",
        ),
        Row(
            f"`status` overhead above the C echo floor (p50), {where}",
            _us(ours["overhead_us"]),
            "plugin server",
            _us(plugin["overhead_us"]),
            "below the floor"
            if ours["overhead_us"] <= 0
            else _times(ratio, "less")
            if ratio >= 1
            else _times(1 / ratio, "more"),
            "≤ ⅔ the plugin's (≥ 1.5x less)",
            ours["overhead_us"] <= plugin["overhead_us"] / OVERHEAD_TARGET,
            f"floor {_us(echo['p50_us'])}",
        ),
    ]


def _soak_row(s: Json) -> Row:
    before, after = s["before"], s["after"]
    leaks = {k: (before[k], after[k]) for k in ("processes", "open_fds", "temp_entries")}
    clean = all(a <= b for b, a in leaks.values()) and s["after_exit_temp_entries"] == 0
    met = not s["answered_twice"] and clean and s["exit_code"] == 0 and s["fuzz"]["alive_after"]
    return Row(
        "soak: every id answered once, nothing left over",
        f"{s['fuzz']['lines']:,} fuzzed lines ({s['fuzz']['status_path_lines']:,} through the "
        f"status path), {s['infer']['infers']} infers",
        "",
        "",
        "",
        "no id twice; processes, fds, temp dirs back",
        met,
        f"infer outcomes {s['infer']['outcomes']}, {s['infer']['workers_killed']} workers killed; "
        + ", ".join(f"{k} {b}->{a}" for k, (b, a) in leaks.items())
        + f"; RSS {before['rss_mib']}->{after['rss_mib']} MiB",
    )


PLACES = (
    ("one_cpu", "client and server on one CPU"),
    ("two_cpus", "client and server on two CPUs"),
)


def _pipelined_row(p: Json, n: int, where: str) -> Row:
    ours, plugin = p["ours"]["req_per_s"], p["plugin"]["req_per_s"]
    return Row(
        f"pipelined `status` throughput, {where}",
        f"{ours:,.0f} req/s",
        "plugin server",
        f"{plugin:,.0f} req/s",
        _times(ours / plugin, "more") if ours >= plugin else _times(plugin / ours, "less"),
        "≥ 2x the plugin's",
        ours >= 2 * plugin,
        f"C echo {p['echo']['req_per_s']:,.0f} req/s; {n:,} requests a run; server CPU per "
        f"request: ours {_us(p['ours']['cpu_us_per_request'])}, plugin "
        f"{_us(p['plugin']['cpu_us_per_request'])}",
    )


def _spawn_rows(s: Json) -> list[Row]:
    rows = []
    if "ours_one_cpu" in s:
        ours, plugin = s["ours_one_cpu"]["median_s"], s["plugin_one_cpu"]["median_s"]
        rows.append(
            Row(
                "spawn to `ready`, server on one CPU",
                _ms(ours),
                "plugin server",
                _ms(plugin),
                _faster_or_slower(ours, plugin),
                "no slower than the plugin's",
                ours <= plugin,
            )
        )
    ours, plugin = s["ours"]["median_s"], s["plugin"]["median_s"]
    rows.append(
        Row(
            "spawn to `ready`, unpinned",
            _ms(ours),
            "plugin server",
            _ms(plugin),
            _faster_or_slower(ours, plugin),
            "≤ 100 ms",
            ours <= 0.100,
            f"plugin with `rlm` hidden (stub mode): {_ms(s['plugin_stub']['median_s'])}",
        )
    )
    return rows


def _first_answer_rows(f: Json) -> list[Row]:
    ours, plugin = f["ours"], f["plugin"]
    return [
        Row(
            "spawn to first `status` answered, client and server on one CPU",
            _ms(ours["first_answer_s"]),
            "plugin server",
            _ms(plugin["first_answer_s"]),
            _faster_or_slower(ours["first_answer_s"], plugin["first_answer_s"]),
            "",
            None,
            "the request written at once, before `ready`",
        ),
        Row(
            "`status` round trip p50 (p99) in the first second after spawn, one CPU",
            f"{_us(ours['early_p50_us'])} ({_us(ours['early_p99_us'])})",
            "ours in the second second",
            f"{_us(ours['late_p50_us'])} ({_us(ours['late_p99_us'])})",
            _faster_or_slower(ours["early_p50_us"], ours["late_p50_us"]),
            "no slower than the second second (p50 within 10%)",
            ours["early_p50_us"] <= 1.1 * ours["late_p50_us"],
            "one `status` a millisecond, each waiting for its answer, while the zygote imports "
            f"`rlm` and warms up; plugin: {_us(plugin['early_p50_us'])} "
            f"({_us(plugin['early_p99_us'])}) then {_us(plugin['late_p50_us'])} "
            f"({_us(plugin['late_p99_us'])})",
        ),
    ]


def _exit_rows(e: Json) -> list[Row]:
    rows = []
    for when, what in (("cold", "right after spawn"), ("warm", "once warm")):
        ours, plugin = e[f"ours_{when}"]["median_s"], e[f"plugin_{when}"]["median_s"]
        rows.append(
            Row(
                f"end of stdin to exit, nothing in flight, {what}",
                _ms(ours),
                "plugin server",
                _ms(plugin),
                _faster_or_slower(ours, plugin),
                "≤ 100 ms",
                ours <= 0.100,
            )
        )
    return rows


def _cluster_rows(c: Json) -> list[Row]:
    overhead = c["overhead"]
    rows = [
        Row(
            "one instant infer, --executor ray (3 nodes)",
            _ms(overhead["ray"]["median_s"]),
            "local executor",
            _ms(overhead["local"]["median_s"]),
            f"+{overhead['added_s'] * 1000:.1f} ms",
            "",
            None,
            "Ray's multi-node test cluster on this machine",
        ),
        Row(
            f"{c['wide']['n']} concurrent {c['wide']['model_delay_ms']} ms infers, 3 nodes",
            _s(c["wide"]["wall_s"]),
            "",
            "",
            "",
            "",
            None,
            f"{c['wide']['max_in_flight_at_model']} at the model at once",
        ),
    ]
    for nodes, cpu in c["cpu"].items():
        rows.append(
            Row(
                f"{cpu['jobs']} jobs of {cpu['cpu_s']:.0f} s CPU in the REPL, {nodes} node(s)",
                _s(cpu["wall_s"]),
                "",
                "",
                "",
                "",
                None,
                f"one slot per node; {c['cores']} cores on this machine",
            )
        )
    return rows


def _mcp_rows(m: Json) -> list[Row]:
    """`rlm-server mcp` beside the JSON-RPC mode of the same server."""
    one_mcp, one_rpc = (m["one"][k]["median_s"] for k in ("mcp", "jsonrpc"))
    n_mcp, n_rpc = (m["concurrent"][k]["median_s"] for k in ("mcp", "jsonrpc"))
    init, ready = (m["spawn"][k]["median_s"] for k in ("initialize", "ready"))
    n = m["concurrent_n"]
    return [
        Row(
            "one `rlm_ask` (MCP), instant model, one root call",
            _ms(one_mcp),
            "one `infer` (JSON-RPC)",
            _ms(one_rpc),
            f"{(one_mcp - one_rpc) * 1000:+.1f} ms",
            "within 5 ms of JSON-RPC",
            one_mcp - one_rpc <= 0.005,
        ),
        Row(
            f"{n} concurrent `rlm_ask` (MCP), instant model",
            _ms(n_mcp),
            f"{n} concurrent `infer` (JSON-RPC)",
            _ms(n_rpc),
            f"{n_mcp / n_rpc:.2f}x",
            "≤ 1.2x JSON-RPC",
            n_mcp <= 1.2 * n_rpc,
        ),
        Row(
            "spawn to a completed `initialize` (MCP)",
            _ms(init),
            "spawn to `ready` (JSON-RPC)",
            _ms(ready),
            _faster_or_slower(init, ready),
            "",
            None,
        ),
    ]


def _tool_row(t: Json) -> Row:
    ours, lib = t["ours"], t["library"]
    return Row(
        "host tool round trip from model code, trivial handler, median (p99)",
        f"{_us(ours['median_us'])} ({_us(ours['p99_us'])})",
        "`rlm` library, `custom_tools` in one process",
        f"{lib['median_us']:.2f} µs ({lib['p99_us']:.2f} µs)",
        f"+{_us(ours['median_us'] - lib['median_us'])}",
        "≤ 1 ms",
        ours["median_us"] <= 1000,
        f"{len(ours['runs'])} infer(s) of {t['calls']:,} calls of `ping` each, timed in the "
        "REPL; medians over the infers",
    )


def build_rows(r: Json) -> list[Row]:
    rows: list[Row] = []
    if "soak" in r:
        rows.append(_soak_row(r["soak"]))
    if "cluster" in r:
        rows.extend(_cluster_rows(r["cluster"]))
    if "status_rtt" in r:
        for place, where in PLACES:
            if place in r["status_rtt"]:
                rows.extend(_rtt_rows(r["status_rtt"][place], where))
    if "pipelined" in r:
        p = r["pipelined"]
        rows.extend(
            _pipelined_row(p[place], p["n_per_run"], where) for place, where in PLACES if place in p
        )
    if "spawn_ready" in r:
        rows.extend(_spawn_rows(r["spawn_ready"]))
    if "first_answers" in r:
        rows.extend(_first_answer_rows(r["first_answers"]))
    if "exit_eof" in r:
        rows.extend(_exit_rows(r["exit_eof"]))
    if "spawn_first_infer" in r:
        s = r["spawn_first_infer"]
        ours, plugin = s["ours"]["median_s"], s["plugin"]["median_s"]
        rows.append(
            Row(
                "spawn to first `infer` answered (instant model)",
                _ms(ours),
                "plugin server",
                _ms(plugin),
                _faster_or_slower(ours, plugin),
                "≤ 600 ms",
                ours <= 0.600,
            )
        )
    if "one_infer" in r:
        o = r["one_infer"]
        ours, lib, plugin = (o[k]["median_s"] for k in ("ours", "library", "plugin"))
        rows.append(
            Row(
                "one `infer`, instant model, one root call",
                _ms(ours),
                "`rlm` library directly",
                _ms(lib),
                _faster_or_slower(ours, lib),
                "≥ 10x faster than the library",
                lib / ours >= 10,
                f"ours as timed by the server itself (metadata.elapsed_ms): "
                f"{_ms(o['ours']['server_elapsed_median_s'])}"
                if "server_elapsed_median_s" in o["ours"]
                else "",
            )
        )
        rows.append(
            Row(
                "one `infer`, instant model, one root call",
                _ms(ours),
                "plugin server",
                _ms(plugin),
                _faster_or_slower(ours, plugin),
                "",
                None,
            )
        )
    if "mcp" in r:
        rows.extend(_mcp_rows(r["mcp"]))
    if "tool_roundtrip" in r:
        rows.append(_tool_row(r["tool_roundtrip"]))
    if "sandbox_cost" in r:
        sc = r["sandbox_cost"]
        on, off = sc["auto"]["median_s"], sc["off"]["median_s"]
        rows.append(
            Row(
                "one `infer`, instant model, in the sandbox (`--sandbox auto`)",
                _ms(on),
                "ours, `--sandbox off`",
                _ms(off),
                f"+{(on - off) * 1000:.1f} ms",
                "≤ 25 ms",
                on <= 0.025,
                f"{len(sc['auto']['protections'])} protections in force: "
                + ", ".join(sc["auto"]["protections"]),
            )
        )
    if "concurrency" in r:
        c = r["concurrency"]
        n = str(max(int(k) for k in c["ours"]))
        ours = c["ours"][n]["median_s"]
        plugin = c["plugin"][n]
        mark = "" if plugin["measured"] else f" (extrapolated from N={plugin['extrapolated_from']})"
        rows.append(
            Row(
                f"{n} concurrent `infer`, {c['model_delay_ms'] / 1000:g} s model, "
                f"`--max-concurrency {max(64, int(n))}`",
                _s(ours),
                "plugin server",
                _s(plugin["median_s"]) + mark,
                _times(plugin["median_s"] / ours, "faster"),
                "all answered within 2 s",
                ours <= 2.0,
                f"at most {c.get('ours_max_in_flight_at_model', '?')} calls at the model at once",
            )
        )
    if "needle" in r:
        nd = r["needle"]
        size = nd["context_bytes"]
        ours = nd["ours"]
        lib = nd["library"]
        found = "found" if ours["found"] else "NOT FOUND"
        rows.append(
            Row(
                f"{_bytes(size)} context, needle found through the REPL: time",
                f"{_s(ours['median_s'])} ({found})",
                "`rlm` library directly",
                f"{_s(lib['time_s'])} ({'found' if lib['found'] else 'NOT FOUND'})",
                _faster_or_slower(ours["median_s"], lib["time_s"]),
                "≤ 10 s",
                ours["median_s"] <= 10 and ours["found"],
                "plugin server: cannot receive it (64 KiB line limit)",
            )
        )
        peak = ours["peak_kib"] * 1024
        lib_peak = lib["peak_kib"] * 1024
        rows.append(
            Row(
                f"{_bytes(size)} context: peak RSS, server + zygote + worker",
                f"{peak / MIB:,.0f} MiB ({peak / size:.2f}x context)",
                "`rlm` library directly",
                f"{lib_peak / MIB:,.0f} MiB ({lib_peak / size:.2f}x context)",
                _times(lib_peak / peak, "less")
                if peak <= lib_peak
                else _times(peak / lib_peak, "more"),
                "≤ 4x the context",
                peak <= 4 * size,
                "sum of VmRSS over the process tree, sampled every 10 ms (idle before the "
                f"request: {ours['idle_kib'] / 1024:,.0f} MiB; peaks apart: server "
                f"{ours['peak_server_kib'] / 1024:,.0f} MiB, zygote + worker "
                f"{ours['peak_zygote_and_worker_kib'] / 1024:,.0f} MiB); library: its VmHWM",
            )
        )
    rows.extend(_context_rows(r))
    if "line_ours" in r and "line_plugin" in r:
        ours = r["line_ours"]["largest_accepted_bytes"]
        plugin = r["line_plugin"]["largest_accepted_bytes"]
        over = [p for p in r["line_ours"]["probes"] if p["bytes"] > 1 << 30]
        refused = all(p["refused_32600"] and p["alive_after"] for p in over)
        rows.append(
            Row(
                "largest line accepted",
                _bytes(ours),
                "plugin server",
                _bytes(plugin) if plugin % 1024 == 0 else f"{plugin:,} B",
                _times(ours / plugin, "longer") if plugin else "",
                "1 GiB",
                ours >= 1 << 30 and refused,
                "ours: 1 GiB + 1 B refused with -32600, server kept running"
                if refused
                else "ours: the line over 1 GiB was NOT refused cleanly",
            )
        )
    return rows


def _unsandboxed(c: Json) -> str:
    """The same figure with `--sandbox off`: each sandboxed worker is three processes."""
    off = c.get("stored_sandbox_off")
    if off is None:
        return ""
    peak = off["peak_kib"] * 1024
    return (
        f"; with `--sandbox off` (one process per worker instead of a keeper, an init and the "
        f"job): {peak / MIB:,.0f} MiB ({peak / c['context_bytes']:.2f}x)"
    )


def _context_rows(r: Json) -> list[Row]:
    """The stored-context figures (issue 11), each beside today's path: the context as a
    `prompt`, sent with every question."""
    rows: list[Row] = []
    if "context_reuse" in r:
        c = r["context_reuse"]
        size, load, stored, prompt = c["context_bytes"], c["load"], c["stored"], c["prompt"]
        ours, today = stored["reach_median_s"], prompt["reach_median_s"]
        rows.append(
            Row(
                f"a question on a loaded {_bytes(size)} context: from the request to the model",
                _ms(ours) + ("" if stored["found"] else " (NOT FOUND)"),
                "the context as its `prompt`",
                _ms(today) + ("" if prompt["found"] else " (NOT FOUND)"),
                _faster_or_slower(ours, today),
                "≤ 50 ms",
                ours <= 0.050 and stored["found"],
                f"median of questions 2 to {len(stored['runs']) + 1} on it (the first, which has "
                f"its holder read it: {_ms(c['first']['reach_s'])}) against "
                f"{len(prompt['runs'])} with it as the prompt; answered (the needle found by "
                f"model code): {_ms(stored['answer_median_s'])} against "
                f"{_ms(prompt['answer_median_s'])}; loaded in {load['chunks']} chunks of "
                f"{_bytes(load['chunk_bytes'])} in {_s(load['load_s'])}",
            )
        )
    if "context_concurrent" in r:
        c = r["context_concurrent"]
        size, n, stored, prompt = c["context_bytes"], c["questions"], c["stored"], c["prompt"]
        ours, today = stored["peak_kib"] * 1024, prompt["peak_kib"] * 1024
        rows.append(
            Row(
                f"{n} questions at once on one loaded {_bytes(size)} context: peak memory of "
                "the whole server tree",
                f"{ours / MIB:,.0f} MiB ({ours / size:.2f}x context)"
                + ("" if stored["found"] else " (NOT FOUND)"),
                "the context as their `prompt`",
                f"{today / MIB:,.0f} MiB ({today / size:.2f}x context)",
                _times(today / ours, "less") if ours <= today else _times(ours / today, "more"),
                "≤ 1.5x the context",
                ours <= 1.5 * size and stored["found"],
                "PSS summed over server, zygote and workers (/proc/PID/smaps_rollup: a page they "
                "share copy-on-write counts once), sampled every 10 ms from the first request "
                f"to the last answer, every call held at the model until all {n} are there; "
                f"idle before: {stored['idle_kib'] / 1024:,.0f} MiB, so each question added "
                f"{(stored['peak_kib'] - stored['idle_kib']) / n / 1024:,.1f} MiB; peaks apart: "
                f"server {stored['peak_server_kib'] / 1024:,.0f} MiB, zygote + workers "
                f"{stored['peak_children_kib'] / 1024:,.0f} MiB; the first question on it, "
                f"alone (its holder reads it): {c['first']['peak_kib'] / 1024:,.0f} MiB"
                + _unsandboxed(c),
            )
        )
    if "context_2g" in r:
        c = r["context_2g"]
        size, load, hwm = c["context_bytes"], c["load"], c["server_hwm_kib"] * 1024
        rate = size / MIB / load["load_s"]
        rows.append(
            Row(
                f"{_bytes(size)} context loaded in {_bytes(load['chunk_bytes'])} chunks, needle "
                "found through the REPL: the server's own peak RSS",
                f"{hwm / MIB:,.0f} MiB ({'found' if c['found'] else 'NOT FOUND'})",
                "the context as a `prompt`",
                f"cannot: one line, over {_bytes(c['max_message_bytes'])}",
                "",
                "found, ≤ 300 MB",
                c["found"] and hwm <= 300e6,
                f"the server's VmHWM; loaded in {_s(load['load_s'])} ({rate:,.0f} MiB/s), the "
                f"question answered in {_s(c['answer_s'])}; peak PSS of the whole tree: "
                f"{c['loading_peak_tree_pss_kib'] / 1024:,.0f} MiB loading, "
                f"{c['asking_peak_tree_pss_kib'] / 1024:,.0f} MiB asking",
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Rendering


COLUMNS = ("figure", "ours", "compared with", "theirs", "ratio", "target", "")


def _cells(row: Row) -> list[str]:
    return [row.figure, row.ours, row.other_name, row.other, row.ratio, row.target, row.verdict]


def text_table(rows: list[Row]) -> str:
    cells = [list(COLUMNS)] + [[c.replace("`", "") for c in _cells(r)] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    out = []
    for index, line in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = [f"  - {r.figure.replace('`', '')}: {r.detail}" for r in rows if r.detail]
    return "\n".join(out + (["", "notes:", *notes] if notes else []))


def markdown_table(rows: list[Row]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [c.replace("|", "\\|") for c in _cells(row)]
        if row.verdict == "MISSED":
            cells[-1] = "**MISSED**"
        out.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r.figure}: {r.detail}" for r in rows if r.detail]
    return "\n".join(out + (["", *notes] if notes else []))


def rows_json(rows: list[Row]) -> list[Json]:
    return [asdict(r) | {"verdict": r.verdict} for r in rows]


# ---------------------------------------------------------------------------------------------
# The plot: wall time against concurrent requests, log-log


def concurrency_svg(c: Json) -> str:
    width, height = 640, 400
    left, right, top, bottom = 70, 170, 40, 60
    pw, ph = width - left - right, height - top - bottom
    series = {
        "rlm-server": ("#1f77b4", c["ours"]),
        "plugin server": ("#d62728", c["plugin"]),
    }
    levels = sorted({int(k) for s in series.values() for k in s[1]})
    values = [v["median_s"] for _, data in series.values() for v in data.values()]
    nice = [m * 10**e for e in range(-3, 5) for m in (1, 2, 5)]
    y_min = max(v for v in nice if v <= min(values))
    y_max = min(v for v in nice if v >= max(values) * 1.05)
    x_min, x_max = math.log2(levels[0]), math.log2(levels[-1])

    def x(n: int) -> float:
        return left + (math.log2(n) - x_min) / ((x_max - x_min) or 1) * pw

    def y(seconds: float) -> float:
        span = math.log10(y_max) - math.log10(y_min)
        return top + ph - (math.log10(seconds) - math.log10(y_min)) / span * ph

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left + pw / 2}" y="22" text-anchor="middle" font-size="14">Wall time of N '
        f"concurrent infer requests ({c['model_delay_ms'] / 1000:g} s model)</text>",
    ]
    for v in nice:
        if y_min <= v <= y_max:
            parts.append(
                f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                f'stroke="#ddd"/><text x="{left - 6}" y="{y(v) + 4:.1f}" '
                f'text-anchor="end">{v:g} s</text>'
            )
    for n in levels:
        parts.append(
            f'<line x1="{x(n):.1f}" x2="{x(n):.1f}" y1="{top}" y2="{top + ph}" stroke="#eee"/>'
            f'<text x="{x(n):.1f}" y="{top + ph + 18}" text-anchor="middle">{n}</text>'
        )
    parts.append(
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>'
        f'<text x="{left + pw / 2}" y="{height - 18}" text-anchor="middle">concurrent requests '
        f"N (log scale)</text>"
        f'<text transform="translate(18 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
        f"wall time (log scale)</text>"
    )
    model_s = c["model_delay_ms"] / 1000
    if y_min <= model_s <= y_max:
        parts.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y(model_s):.1f}" y2="{y(model_s):.1f}" '
            f'stroke="#888" stroke-dasharray="2,3"/>'
            f'<line x1="{left + pw + 12}" x2="{left + pw + 36}" y1="{top + 50}" y2="{top + 50}" '
            f'stroke="#888" stroke-dasharray="2,3"/><text x="{left + pw + 42}" y="{top + 54}">'
            f"the model alone</text>"
        )
    for index, (name, (color, data)) in enumerate(series.items()):
        points = sorted((int(k), v) for k, v in data.items())
        measured = [(n, v) for n, v in points if v.get("measured", True)]
        path = " ".join(f"{x(n):.1f},{y(v['median_s']):.1f}" for n, v in measured)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        extra = [(n, v) for n, v in points if not v.get("measured", True)]
        if extra and measured:
            chain = [measured[-1], *extra]
            dashed = " ".join(f"{x(n):.1f},{y(v['median_s']):.1f}" for n, v in chain)
            parts.append(
                f'<polyline points="{dashed}" fill="none" stroke="{color}" stroke-width="2" '
                f'stroke-dasharray="5,4"/>'
            )
        for n, v in points:
            filled = color if v.get("measured", True) else "white"
            parts.append(
                f'<circle cx="{x(n):.1f}" cy="{y(v["median_s"]):.1f}" r="4" fill="{filled}" '
                f'stroke="{color}" stroke-width="2"><title>{name}, N={n}: '
                f"{v['median_s']:.2f} s</title></circle>"
            )
        ly = top + 10 + index * 20
        parts.append(
            f'<line x1="{left + pw + 12}" x2="{left + pw + 36}" y1="{ly}" y2="{ly}" '
            f'stroke="{color}" stroke-width="2"/><text x="{left + pw + 42}" y="{ly + 4}">{name}'
            "</text>"
        )
    parts.append(
        f'<text x="{left + pw + 12}" y="{top + 85}" fill="#555">open dot, dashed:</text>'
        f'<text x="{left + pw + 12}" y="{top + 100}" fill="#555">extrapolated</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
