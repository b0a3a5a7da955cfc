"""`rlm-server eval [--tasks ...] [--sizes ...] [--seeds N] [--window N] [--jobs N]
[--budget-usd X] [--out DIR] [server flags]`.

Every other flag is the server's own (`--backend`, `--model`, `--base-url`, `--record`,
`--replay`, ...), read with the same environment variables, and the engine is built from that
configuration as the server builds it: same keys, same broker, same budgets, same sandbox.
`--budget-usd` becomes the engine's lifetime spend limit, so no call that could pass it is made.

Writes DIR/runs.jsonl (one row per run, as it finishes), DIR/report.md and DIR/scores.svg, and
prints the report on stdout; the progress bar is on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from rlm_server import Json
from rlm_server.config import Config
from rlm_server.tools.eval.tasks import TASKS

if TYPE_CHECKING:
    from rlm_server.tools.eval.runner import Plan

DEFAULT_SIZES = "8k,32k,128k,512k"
DEFAULT_WINDOW = "400k"
CHARS_PER_TOKEN = 4  # a window given in tokens ("100kt") is counted at this many characters
UNITS = {"k": 1_000, "m": 1_000_000}
NEEDS_HARD_NEEDLE = ("niah", "multi-niah")


def parse_size(raw: str) -> int:
    """`8000`, `8k`, `4M` characters; with a trailing `t`, tokens (4 characters each)."""
    text = raw.strip().lower()
    per = CHARS_PER_TOKEN if text.endswith("t") else 1
    text = text.removesuffix("t")
    scale = UNITS.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in UNITS else text
    try:
        value = round(float(number) * scale * per)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {raw!r} (e.g. 8k, 4M, 100kt)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a positive size: {raw!r}")
    return value


def _listed(parse: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def parse_list(raw: str) -> tuple[Any, ...]:
        return tuple(parse(item) for item in raw.split(",") if item.strip())

    return parse_list


def _task(raw: str) -> str:
    if raw.strip() not in TASKS:
        raise argparse.ArgumentTypeError(f"unknown task {raw!r} (tasks: {', '.join(TASKS)})")
    return raw.strip()


def _positive(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"not a positive number: {raw!r}")
    return int(raw)


def _usd(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1
    if not value > 0:
        raise argparse.ArgumentTypeError(f"not a positive amount: {raw!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlm-server eval",
        allow_abbrev=False,  # the rest goes to the server's parser
        description="Run generated long-context tasks through the RLM and through the bare "
        "model, side by side. Any other flag is the server's (see rlm-server --help).",
    )
    parser.add_argument("--tasks", type=_listed(_task), default=TASKS, help="comma-separated")
    parser.add_argument(
        "--sizes", type=_listed(parse_size), default=DEFAULT_SIZES, help="input sizes: 8k,4M"
    )
    parser.add_argument("--seeds", type=_positive, default=3, help="seeds per task and size")
    parser.add_argument(
        "--window",
        type=parse_size,
        default=DEFAULT_WINDOW,
        help="the base model's input limit: characters (400k) or tokens (100kt)",
    )
    parser.add_argument(
        "--jobs",
        type=_positive,
        default=1,
        help="tasks run at once (an RLM run is a worker process; --max-concurrency bounds it)",
    )
    parser.add_argument("--budget-usd", type=_usd, help="stop before spending more than this")
    parser.add_argument("--out", type=Path, default=Path("rlm-eval"), help="output directory")
    return parser


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args, server_args = parser.parse_known_args(list(argv))
    if any(task in NEEDS_HARD_NEEDLE for task in args.tasks) and not _has_hard_needle():
        print(
            "rlm-server eval: the niah tasks need hard-needle: pip install 'rlm-server[eval]'",
            file=sys.stderr,
        )
        return 2
    from rlm_server.cli import configured, sandboxed

    environ = dict(os.environ)
    started = configured(server_args, environ, "rlm-server eval")
    if started is None:
        return 2
    config = sandboxed(*started, "rlm-server eval")
    if config is None:
        return 2
    if args.budget_usd is not None:
        limits = [x for x in (config.spend_limit_usd, args.budget_usd) if x is not None]
        config = config._replace(spend_limit_usd=min(limits))
    from rlm_server.tools.eval.runner import Plan

    sizes = tuple(sorted(set(args.sizes)))
    plan = Plan(tuple(args.tasks), sizes, args.seeds, args.window, args.jobs)
    try:
        return anyio.run(_evaluate, config, environ, plan, args.out, backend="asyncio")
    except KeyboardInterrupt:
        print(f"\nrlm-server eval: interrupted; the runs so far are in {args.out}", file=sys.stderr)
        return 130


def _has_hard_needle() -> bool:
    import importlib.util

    return importlib.util.find_spec("hard_needle") is not None


async def _evaluate(config: Config, environ: dict[str, str], plan: Plan, out: Path) -> int:
    from rlm_server.engine.engine import Engine
    from rlm_server.errors import RpcError
    from rlm_server.tools.eval.report import plot, table
    from rlm_server.tools.eval.runner import Progress, evaluate

    engine = Engine(config, environ)
    if engine.unavailable_reason is not None:
        print(f"rlm-server eval: no usable backend: {engine.unavailable_reason}", file=sys.stderr)
        return 2
    await anyio.Path(out).mkdir(parents=True, exist_ok=True)
    rows: list[Json] = []
    header = {
        "backend": config.backend,
        "model": config.effective_model,
        "seeds": plan.seeds,
        "window": plan.window,
        "stopped": False,
    }
    await engine.load_prices()  # costs for every call, not only under a cost limit
    engine.start()
    try:
        with (out / "runs.jsonl").open("wb") as sink:

            def keep(row: Json) -> None:
                rows.append(row)
                sink.write(orjson.dumps({**row, "model": header["model"]}) + b"\n")
                sink.flush()

            header["stopped"] = not await evaluate(engine, plan, keep, Progress(plan.total))
    except RpcError as refused:  # e.g. a cost limit on a model without a known price
        print(f"rlm-server eval: {refused.data.get('reason', refused.message)}", file=sys.stderr)
        return 2
    finally:
        engine.close()
        await engine.release_models()
        report = table(rows, header)
        (out / "report.md").write_text(report, encoding="utf-8")
        (out / "scores.svg").write_text(plot(rows, header), encoding="utf-8")
    sys.stdout.write(report)
    return 0
