"""python -m rlmbench [--quick] [--only a,b [--merge]] [--plugin-full]: run the figures, print the
table, write results/latest.{json,md} and results/concurrency.svg, and refresh the README's table.

bench/run sets up the environments and calls this; see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from rlmbench import report
from rlmbench.figures import Bench, Settings
from rlmbench.procs import BENCH, ROOT, TMP, Fixture, targets

FIGURES = (
    "status_rtt",
    "pipelined",
    "spawn_ready",
    "first_answers",
    "exit_eof",
    "spawn_first_infer",
    "one_infer",
    "mcp",
    "tool_roundtrip",
    "sandbox_cost",
    "concurrency",
    "needle",
    "context_reuse",
    "context_concurrent",
    "context_2g",
    "line_ours",
    "line_plugin",
)
OPT_IN = ("soak", "cluster")  # run only when named: bench/run --only soak
README_START = "<!-- results:start (written by bench/run) -->"
README_END = "<!-- results:end -->"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def _version(python: str, dist: str) -> str:
    return _run(python, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))") or "?"


def machine(args: argparse.Namespace) -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = _run("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    dirty = _run("git", "-C", str(ROOT), "status", "--porcelain", "--", "src")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "commit": commit + (" (src/ modified)" if dirty else ""),
        "rlms": _version(sys.executable, "rlms"),
        "plugin": _version(args.plugin_python, "elizaos-plugin-rlm"),
        "plugin_rlms": _version(args.plugin_python, "rlms"),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run")
    parser.add_argument("--only", help="comma-separated figures: " + ", ".join(FIGURES + OPT_IN))
    parser.add_argument(
        "--plugin-full",
        action="store_true",
        help="run the plugin at 64 concurrent requests too (about 100 s) instead of extrapolating",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --only: put these figures into results/latest.json beside the other figures "
        "of the last full run, and rewrite the tables with all of them (the header says which "
        "figures were measured when)",
    )
    parser.add_argument(
        "--out",
        help="directory for the results (default: results/ for a full run, results/tmp/ otherwise)",
    )
    parser.add_argument("--ours", default=os.environ.get("RLMBENCH_OURS"), required=False)
    parser.add_argument("--plugin-python", default=os.environ.get("RLMBENCH_PLUGIN_PYTHON"))
    parser.add_argument("--echo", default=os.environ.get("RLMBENCH_ECHO"))
    args = parser.parse_args(argv)
    if not args.ours:
        found = shutil.which("rlm-server", path=str(Path(sys.executable).parent))
        args.ours = found or f"{sys.executable} -m rlm_server"
    args.plugin_python = args.plugin_python or str(BENCH / ".venv-plugin" / "bin" / "python")
    args.echo = args.echo or str(BENCH / "build" / "echo")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    selected = FIGURES if not args.only else tuple(args.only.split(","))
    unknown = set(selected) - set(FIGURES) - set(OPT_IN)
    if unknown:
        raise SystemExit(f"unknown figures: {', '.join(sorted(unknown))}")
    settings = Settings.quick() if args.quick else Settings()
    if args.plugin_full:
        settings.plugin_conc_levels = tuple(settings.conc_levels)
    full = not args.quick and not args.only
    merge = bool(args.merge and args.only and not args.quick)
    out = Path(args.out) if args.out else (BENCH / "results" if full or merge else TMP)
    out.mkdir(parents=True, exist_ok=True)

    info = machine(args)
    info["load_before"] = os.getloadavg()
    log(f"machine: {info['cpus']} CPUs, {info['cpu']}; load average {info['load_before']}")
    started = time.monotonic()
    fixture = Fixture()
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    try:
        bench = Bench(
            fixture,
            targets(args.ours.split(), args.plugin_python, args.echo, fixture.base_url),
            settings,
            log,
        )
        for name in selected:
            log(f"== {name}")
            t = time.monotonic()
            try:
                results[name] = getattr(bench, name)()
            except Exception as exc:  # one broken figure must not lose the others
                failures[name] = f"{type(exc).__name__}: {exc}"
                log(traceback.format_exc())
            log(f"   ({time.monotonic() - t:.0f} s)")
    finally:
        fixture.close()
    info["load_after"] = os.getloadavg()
    info["duration_s"] = round(time.monotonic() - started, 1)
    info["settings"] = settings.__dict__ | {"conc_levels": list(settings.conc_levels)}

    document: dict[str, Any] = {"machine": info, "results": results, "failures": failures}
    if merge:
        document = merged(json.loads((out / "latest.json").read_text()), document, selected)
    rows = report.build_rows(document["results"])
    table = report.text_table(rows)
    header = "rlm-server bench, " + run_header(document["machine"])
    for later in document.get("merged", []):
        figures = ", ".join(later["figures"])
        header += f"; {figures} from a later run: {run_header(later['machine'])}"
    print()
    print(header)
    print()
    print(table)
    if failures:
        print("\nFAILED figures:")
        for name, why in failures.items():
            print(f"  {name}: {why}")

    document["rows"] = report.rows_json(rows)
    results = document["results"]
    (out / "latest.json").write_text(json.dumps(document, indent=2) + "\n")
    markdown = f"{header}\n\n{report.markdown_table(rows)}\n"
    if failures:
        markdown += "\nFailed figures: " + "; ".join(f"{k}: {v}" for k, v in failures.items())
        markdown += "\n"
    (out / "latest.md").write_text(markdown)
    if "concurrency" in results:
        (out / "concurrency.svg").write_text(report.concurrency_svg(results["concurrency"]))
    print(
        f"\nwrote {out / 'latest.json'}, {out / 'latest.md'}"
        + (f", {out / 'concurrency.svg'}" if "concurrency" in results else "")
    )
    if (full or merge) and not failures:
        update_readme(markdown)
        print("updated the results in bench/README.md and README.md")
    return 1 if failures else 0


def run_header(info: dict[str, Any]) -> str:
    return (
        f"{info['date']}, commit {info['commit']}: {info['cpus']} CPUs ({info['cpu']}), load "
        f"average {info['load_before'][0]:.2f} before, {info['load_after'][0]:.2f} after; "
        f"{info['duration_s']:.0f} s"
    )


def merged(previous: dict[str, Any], run: dict[str, Any], figures: tuple[str, ...]) -> Any:
    """The last full run's document with this run's figures in place of its own (--merge)."""
    earlier = [m for m in previous.get("merged", []) if not set(m["figures"]) <= set(figures)]
    return {
        "machine": previous["machine"],
        "results": {**previous["results"], **run["results"]},
        "failures": run["failures"],
        "merged": [*earlier, {"figures": list(figures), "machine": run["machine"]}],
    }


def update_readme(markdown: str) -> None:
    """Rewrite the results block of bench/README.md and of the repository's README.md."""
    for readme, plot_path in (
        (BENCH / "README.md", "results/concurrency.svg"),
        (BENCH.parent / "README.md", "bench/results/concurrency.svg"),
    ):
        text = readme.read_text()
        pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
        if not pattern.search(text):
            continue
        plot = f"![wall time against concurrent requests]({plot_path})"
        block = f"{README_START}\n{markdown}\n{plot}\n{README_END}"
        start, end = pattern.search(text).span()  # type: ignore[union-attr]  # checked above
        readme.write_text(text[:start] + block + text[end:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
