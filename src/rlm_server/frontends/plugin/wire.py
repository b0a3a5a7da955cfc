"""The elizaOS plugin's line protocol, as pure translations to and from our engine's types.

The published clients of `elizaos-plugin-rlm` (its TypeScript `client.ts` and its Rust crate
0.1.0) spawn `python -m elizaos_plugin_rlm.server` and speak that package's own protocol:
`{"id", "method", "params"}` with no `jsonrpc` member, answers `{"id", "result"}` or
`{"id", "error": "<string>"}`, and an infer's params `{"messages", "opts"}`, where the
TypeScript client writes `opts` in camelCase and the Rust crate in snake_case. Everything here
maps those shapes onto `InferRequest`/`InferOptions` and our results back onto the plugin's
`RLMResult.to_dict()`, so that frontend.py is only the adapter around them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from rlm_server import Json
from rlm_server.engine.api import InferRequest, InferResult, Status
from rlm_server.errors import InvalidParams, RpcError
from rlm_server.frontends.params import MISSING, OPTION_RULES, infer_options, prompt

# The plugin's deadline: both clients give up on a request after 60 s and send it again.
CLIENT_TIMEOUT_S = 60.0
DEFAULT_TIMEOUT_S = 50.0  # ours answers first, so the client sees why instead of a timeout

# opts key (both spellings) -> our InferOptions field. The published server reads only the
# snake_case ones and ignores the rest; we apply every one our engine can apply.
APPLIED_OPTS: Mapping[str, str] = {
    "max_iterations": "max_iterations",
    "maxIterations": "max_iterations",
    "max_depth": "max_depth",
    "maxDepth": "max_depth",
    "root_model": "model",
    "rootModel": "model",
    "model": "model",
    "subcall_model": "sub_model",
    "subcallModel": "sub_model",
    "temperature": "temperature",
    "max_tokens": "max_tokens",
    "maxTokens": "max_tokens",
    "subcall_errors": "subcall_errors",  # ours: the plugin's server has no such option
    "subcallErrors": "subcall_errors",
}
FLAG_OPTS: Mapping[str, str] = {
    "log_trajectories": "trajectory",
    "logTrajectories": "trajectory",
    "track_costs": "cost",
    "trackCosts": "cost",
}
# Every other key (`stream`, `topP`, `stopSequences`, `user`, which the clients' option types
# carry) means nothing for an RLM answer, the final value of a REPL variable: the published
# server ignores them, and so must a drop-in (a refusal would become a stub answer in both
# clients). frontend.py says once on stderr that one was set; `false`, `[]` and `""` are not set
# (the Rust crate always sends `"stream": false`).


@dataclass(frozen=True)
class PluginRequest:
    """One `infer`, translated: what to run, and which extras the answer carries."""

    infer: InferRequest
    trajectory: bool
    cost: bool
    not_applied: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class PluginDefaults:
    """What the plugin's environment says an answer carries unless `opts` says otherwise."""

    trajectory: bool = True
    cost: bool = True

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> PluginDefaults:
        return cls(
            trajectory=_env_bool(environ.get("ELIZA_RLM_LOG_TRAJECTORIES"), True),
            cost=_env_bool(environ.get("ELIZA_RLM_TRACK_COSTS"), True),
        )


def _env_bool(raw: str | None, default: bool) -> bool:
    """The plugin's reading of a boolean variable: 1, true or yes (any case) is true."""
    return default if raw is None else raw.lower() in ("1", "true", "yes")


# ---------------------------------------------------------------------------------------------
# Environment: the plugin's variable names and units onto ours


def plugin_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """Our settings as the plugin's variables mean them.

    The plugin names the root model `ELIZA_RLM_ROOT_MODEL` and the sub-call model
    `ELIZA_RLM_SUBCALL_MODEL`, and counts retry delays in seconds (`1.0`) where we count
    milliseconds. Our own names win when both are set. The deadline defaults below the
    clients' 60 s so that a slow answer arrives as an error they can read, not a timeout.
    """
    translated = dict(environ)
    for theirs, ours in (
        ("ELIZA_RLM_ROOT_MODEL", "ELIZA_RLM_MODEL"),
        ("ELIZA_RLM_SUBCALL_MODEL", "ELIZA_RLM_SUB_MODEL"),
    ):
        if environ.get(theirs) and ours not in environ:
            translated[ours] = environ[theirs]
    for name in ("ELIZA_RLM_RETRY_DELAY", "ELIZA_RLM_RETRY_MAX_DELAY"):
        if name in environ:
            translated[name] = _seconds_to_ms(environ[name])
    translated.setdefault("ELIZA_RLM_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    return translated


def _seconds_to_ms(raw: str) -> str:
    """`1.5` -> `1500.0`; anything unreadable is passed on for the config check to name."""
    try:
        return str(float(raw) * 1000)
    except ValueError:
        return raw


# ---------------------------------------------------------------------------------------------
# Requests


def parse_infer(params: Json, defaults: PluginDefaults) -> PluginRequest:
    """`{"messages" | "prompt", "opts"}` as the published server reads them.

    Like it, `messages` wins over `prompt`, and a string is one user message. Options our
    engine applies are validated by the same rules as our own protocol's `options`, and named
    as the client spelled them (`opts.maxIterations`).
    """
    raw = params["messages"] if "messages" in params else params.get("prompt", "")
    if isinstance(raw, str):
        raw = [{"role": "user", "content": raw}]
    context = prompt(MISSING, raw)
    opts = params.get("opts")
    opts = opts if isinstance(opts, dict) else {}
    options: Json = {}
    flags = {"trajectory": defaults.trajectory, "cost": defaults.cost}
    for key, value in opts.items():
        if value is None:
            continue
        if key in APPLIED_OPTS:
            ours = APPLIED_OPTS[key]
            options[ours] = OPTION_RULES[ours].apply(f"opts.{key}", value)
        elif key in FLAG_OPTS:
            if not isinstance(value, bool):
                raise InvalidParams(f"opts.{key}", "must be true or false")
            flags[FLAG_OPTS[key]] = value
    options["trajectory"] = flags["trajectory"]
    return PluginRequest(
        infer=InferRequest(context, None, infer_options(options, "opts.")),
        trajectory=flags["trajectory"],
        cost=flags["cost"],
        not_applied=frozenset(
            key
            for key, value in opts.items()
            if key not in APPLIED_OPTS and key not in FLAG_OPTS and value not in (False, [], "")
        ),
    )


def _field(path: str, opts: Json) -> str:
    """An engine's field path (`options.model`) as the client spelled it (`opts.rootModel`)."""
    if not path.startswith("options."):
        return path
    ours = path.removeprefix("options.")
    spelled = next((k for k, v in APPLIED_OPTS.items() if v == ours and k in opts), ours)
    return f"opts.{spelled}"


def error_text(error: RpcError, opts: Json) -> str:
    """The plugin's error is a string. Ours names the error's type and, for bad params, the
    field; it never contains the words both clients retry on ("timeout", "connection", "503",
    ...), since once we answer, our own retries are spent."""
    if isinstance(error, InvalidParams):
        field = _field(str(error.data["field"]), opts)
        return f"{error.message}: {field} {error.data['reason']}"
    return f"{error.message} ({error.data['type']})"


# ---------------------------------------------------------------------------------------------
# Answers


def status_result(status: Status) -> Json:
    """The published server's five fields (snake_case, which the Rust crate requires), the two
    the TypeScript client's type declares in camelCase, and our own counters beside them."""
    configuration = status.configuration
    return {
        "available": configuration["available"],
        "backend": configuration["backend"],
        "environment": configuration["environment"],
        "max_iterations": configuration["max_iterations"],
        "max_depth": configuration["max_depth"],
        "maxIterations": configuration["max_iterations"],
        "maxDepth": configuration["max_depth"],
        "server": configuration["server"],
        "version": configuration["version"],
        "stub": configuration["stub"],
        "in_flight": status.in_flight,
        "queued": status.queued,
    }


def infer_result(result: InferResult, request: PluginRequest, started_ms: int) -> Json:
    """Our `infer` result as the plugin's `RLMResult.to_dict()`."""
    metadata = result.metadata
    stub = result.stub
    cost = None if stub or not request.cost else plugin_cost(result.usage, metadata.model)
    trajectory = None
    if not stub and request.trajectory:
        trajectory = plugin_trajectory(result, request.infer, started_ms, cost)
    plugin_metadata: Json = {
        "stub": stub,
        "iterations": None if stub else metadata.iterations,
        "depth": None if stub else metadata.depth,
        "error": None,
    }
    if request.infer.options.subcall_errors == "model":  # only when asked: the plugin's shape
        plugin_metadata["failed_calls"] = metadata.failed_calls
    return {
        "text": result.text.strip(),
        "metadata": plugin_metadata,
        "cost": cost,
        "trajectory": trajectory,
    }


def plugin_cost(usage: Json, root_model: str) -> Json:
    """Token counts as the library measured them, split root model / other models. A cost the
    library could not price (`cost_usd: null`) counts as 0.0: the plugin's type has no null."""
    root: Json = usage["models"].get(root_model, {})
    root_in, root_out = int(root.get("input_tokens", 0)), int(root.get("output_tokens", 0))
    root_usd = float(root.get("cost_usd") or 0.0)
    sub_in = int(usage["input_tokens"]) - root_in
    sub_out = int(usage["output_tokens"]) - root_out
    total_usd = float(usage.get("cost_usd") or 0.0)
    sub_usd = max(0.0, total_usd - root_usd)
    return {
        "root_input_tokens": root_in,
        "root_output_tokens": root_out,
        "subcall_input_tokens": sub_in,
        "subcall_output_tokens": sub_out,
        "total_tokens": root_in + root_out + sub_in + sub_out,
        "root_cost_usd": root_usd,
        "subcall_cost_usd": sub_usd,
        "total_cost_usd": root_usd + sub_usd,
    }


def plugin_trajectory(
    result: InferResult, infer: InferRequest, started_ms: int, cost: Json | None
) -> Json:
    """Our per-iteration trajectory as the plugin's `RLMTrajectory`: one step per code block
    the model ran, with its REPL output and sub-calls."""
    context = infer.context
    prompt = context if isinstance(context, str) else "\n".join(m["content"] for m in context or ())
    blocks = [block for step in result.trajectory or () for block in step["code_blocks"]]
    steps = [_step(number, block, started_ms) for number, block in enumerate(blocks)]
    strategies = list(dict.fromkeys(step["strategy"] for step in steps))
    ended_ms = int(time.time() * 1000)
    return {
        "trajectory_id": str(uuid.uuid4()),
        "start_time_ms": started_ms,
        "end_time_ms": ended_ms,
        "duration_ms": max(0, ended_ms - started_ms),
        "prompt_length": len(prompt),
        "prompt_preview": prompt[:200],
        "steps": steps,
        "final_response": result.text[:500],
        "total_iterations": result.metadata.iterations,
        "max_depth_reached": result.metadata.depth,
        "subcall_count": sum(1 for step in steps if step["is_subcall"]),
        "strategies_used": strategies,
        "cost": cost,
    }


def _step(number: int, block: Json, started_ms: int) -> Json:
    calls: list[Json] = block["sub_calls"]
    return {
        "step_id": str(uuid.uuid4()),
        "step_number": number,
        "timestamp_ms": started_ms,
        "code_executed": block["code"],
        "repl_output": block["stdout"][:500],
        "variables_updated": [],
        "strategy": strategy_of(block["code"], bool(calls)),
        "is_subcall": bool(calls),
        "subcall_prompt": calls[0]["prompt"] if calls else "",
        "subcall_response": calls[0]["response"] if calls else "",
        "input_tokens": sum(int(call["input_tokens"]) for call in calls),
        "output_tokens": sum(int(call["output_tokens"]) for call in calls),
        "duration_ms": int((block["execution_time_s"] or 0.0) * 1000),
    }


def strategy_of(code: str, made_calls: bool) -> str:
    """The paper's names for what a code block did (peek, grep, chunk, stitch, subcall): a
    label for people reading the trajectory, so a rough reading of the code is enough."""
    if made_calls:
        return "subcall"
    text = code.lower()
    labels = (
        ("grep", ("re.search", "re.findall", "re.finditer", "re.match", ".find(", " in context")),
        ("chunk", (".split(", "chunk", "partition")),
        ("peek", ("context[", "print(context", "len(context")),
        ("stitch", (".join(", "+=")),
    )
    return next((label for label, marks in labels if any(m in text for m in marks)), "other")
