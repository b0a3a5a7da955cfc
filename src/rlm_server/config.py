"""Configuration: `ELIZA_RLM_*` environment variables (the elizaOS plugin's names and defaults),
overridden by command-line flags, validated once at start-up.

Every setting is one row of `SETTINGS`, so `--help`, the environment and validation cannot drift
apart. A bad value raises `ConfigError` with one line that names the flag or variable; the CLI
prints it and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from rlm_server import __version__


class ConfigError(Exception):
    """A setting has a value we cannot use; the message is the one line the user sees."""


BACKENDS = (
    "gemini",
    "openai",
    "anthropic",
    "groq",
    "openrouter",
    "vllm",
    "azure_openai",
    "portkey",
    "vercel",
)
SANDBOX_LEVELS = ("strict", "auto", "off")  # see sandbox.py
EXECUTORS = (
    "local",
    "ray",
    "ray,local",
)  # see executors/; `ray,local`: local if Ray is unreachable
ENVIRONMENTS = ("local", "ipython", "docker", "modal", "prime", "e2b", "daytona")


class BackendInfo(NamedTuple):
    """How one user-facing backend name maps onto the `rlm` library's clients."""

    library_backend: str
    key_vars: tuple[str, ...]
    default_model: str
    default_base_url: str | None = None
    openai_compatible: bool = False
    price_provider: str | None = None  # genai-prices' provider id, where it has one


BACKEND_INFO: Mapping[str, BackendInfo] = {
    "gemini": BackendInfo(
        "gemini", ("GEMINI_API_KEY", "GOOGLE_API_KEY"), "gemini-2.5-flash", price_provider="google"
    ),
    "openai": BackendInfo(
        "openai",
        ("OPENAI_API_KEY",),
        "gpt-4o-mini",
        openai_compatible=True,
        price_provider="openai",
    ),
    "anthropic": BackendInfo(
        "anthropic", ("ANTHROPIC_API_KEY",), "claude-sonnet-4-5", price_provider="anthropic"
    ),
    "groq": BackendInfo(
        "openai",
        ("GROQ_API_KEY",),
        "llama-3.3-70b-versatile",
        "https://api.groq.com/openai/v1",
        openai_compatible=True,
        price_provider="groq",
    ),
    "openrouter": BackendInfo(
        "openrouter",
        ("OPENROUTER_API_KEY",),
        "openai/gpt-4o-mini",
        openai_compatible=True,
        price_provider="openrouter",
    ),
    "vllm": BackendInfo("vllm", (), "default", openai_compatible=True),
    "azure_openai": BackendInfo(
        "azure_openai", ("AZURE_OPENAI_API_KEY",), "gpt-4o-mini", price_provider="azure"
    ),
    "portkey": BackendInfo("portkey", ("PORTKEY_API_KEY",), "gpt-4o-mini"),
    "vercel": BackendInfo(
        "vercel", ("AI_GATEWAY_API_KEY",), "openai/gpt-4o-mini", openai_compatible=True
    ),
}


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise ValueError
    return value


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError


def _choice(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise ValueError
        return raw

    return parse


def _text(raw: str) -> str:
    return raw.strip()


def _optional_usd(raw: str) -> float | None:
    return None if not raw.strip() else _positive_float(raw)


def _directory(raw: str) -> str | None:
    """A directory path, made if missing; empty: unset."""
    path = raw.strip()
    if not path:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        raise ValueError(path) from None
    return os.path.abspath(path)


def _names(raw: str) -> tuple[str, ...]:
    """Comma-separated model names."""
    return tuple(name.strip() for name in raw.split(",") if name.strip())


def _urls(raw: str) -> tuple[str, ...]:
    """Comma-separated http(s) URLs, compared without a trailing slash."""
    urls = tuple(url.strip().rstrip("/") for url in raw.split(",") if url.strip())
    if not all(url.startswith(("http://", "https://")) for url in urls):
        raise ValueError
    return urls


def _directories(raw: str) -> tuple[str, ...]:
    """Comma-separated existing directories, by their real path (symlinks resolved)."""
    found = tuple(os.path.realpath(path.strip()) for path in raw.split(",") if path.strip())
    if not all(os.path.isdir(path) for path in found):
        raise ValueError
    return found


class Setting(NamedTuple):
    name: str
    env: str
    default: str
    parse: Callable[[str], Any]
    expect: str
    help: str
    repeatable: bool = False  # the flag may be given again; its values join with commas
    flag: str | None = None  # when the name does not make the flag (see _flag)


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "backend",
        "ELIZA_RLM_BACKEND",
        "gemini",
        _choice(BACKENDS),
        "one of " + ", ".join(BACKENDS),
        "LLM backend",
    ),
    Setting(
        "model",
        "ELIZA_RLM_MODEL",
        "",
        _text,
        "a model name",
        "root model (default: the backend's usual model)",
    ),
    Setting(
        "sub_model",
        "ELIZA_RLM_SUB_MODEL",
        "",
        _text,
        "a model name",
        "model for llm_query sub-calls (default: the root model)",
    ),
    Setting(
        "base_url",
        "ELIZA_RLM_BASE_URL",
        "",
        _text,
        "a URL",
        "base URL of an OpenAI-compatible server (vLLM, llama.cpp, Ollama, LM Studio)",
    ),
    Setting(
        "environment",
        "ELIZA_RLM_ENV",
        "local",
        _choice(ENVIRONMENTS),
        "one of " + ", ".join(ENVIRONMENTS),
        "REPL environment of the rlm library",
    ),
    Setting(
        "max_iterations",
        "ELIZA_RLM_MAX_ITERATIONS",
        "4",
        _positive_int,
        "a positive integer",
        "root model turns per request",
    ),
    Setting(
        "max_depth",
        "ELIZA_RLM_MAX_DEPTH",
        "1",
        _positive_int,
        "a positive integer",
        "recursion depth (1: sub-calls are plain LM calls)",
    ),
    Setting(
        "verbose",
        "ELIZA_RLM_VERBOSE",
        "false",
        _bool,
        "true or false",
        "the library's rich trace, on stderr",
    ),
    Setting(
        "max_retries",
        "ELIZA_RLM_MAX_RETRIES",
        "3",
        _non_negative_int,
        "a non-negative integer",
        "retries of a transient backend failure",
    ),
    Setting(
        "retry_delay_ms",
        "ELIZA_RLM_RETRY_DELAY",
        "1000",
        _positive_float,
        "a positive number of milliseconds",
        "first retry delay, doubled each retry",
    ),
    Setting(
        "retry_max_delay_ms",
        "ELIZA_RLM_RETRY_MAX_DELAY",
        "30000",
        _positive_float,
        "a positive number of milliseconds",
        "cap on the retry delay",
    ),
    Setting(
        "max_concurrency",
        "ELIZA_RLM_MAX_CONCURRENCY",
        "8",
        _positive_int,
        "a positive integer",
        "completions running at once (one worker process each)",
    ),
    Setting(
        "max_queue",
        "ELIZA_RLM_MAX_QUEUE",
        "1000",
        _non_negative_int,
        "a non-negative integer",
        "requests waiting for a slot before -32002 queue_full",
    ),
    Setting(
        "max_queue_bytes",
        "ELIZA_RLM_MAX_QUEUE_BYTES",
        str(4 << 30),
        _positive_int,
        "a positive integer",
        "total prompt size of the requests waiting for a slot before -32002 queue_full",
    ),
    Setting(
        "timeout_s",
        "ELIZA_RLM_TIMEOUT",
        "300",
        _positive_float,
        "a positive number of seconds",
        "default deadline of an infer request",
    ),
    Setting(
        "strict",
        "ELIZA_RLM_STRICT",
        "false",
        _bool,
        "true or false",
        "answer -32003 instead of stub text when the backend is unavailable",
    ),
    Setting(
        "max_message_bytes",
        "ELIZA_RLM_MAX_MESSAGE_BYTES",
        str(1 << 30),
        _positive_int,
        "a positive number of bytes",
        "longest accepted input line",
    ),
    Setting(
        "shutdown_grace_s",
        "ELIZA_RLM_SHUTDOWN_GRACE",
        "30",
        _non_negative_float,
        "a non-negative number of seconds",
        "how long EOF or SIGTERM lets in-flight requests finish",
    ),
    Setting(
        "allow_base_url",
        "ELIZA_RLM_ALLOW_BASE_URL",
        "",
        _urls,
        "http(s) URLs separated by commas",
        "a per-request options.base_url that may be used, with the configured key (repeatable)",
        repeatable=True,
    ),
    Setting(
        "allow_model",
        "ELIZA_RLM_ALLOW_MODEL",
        "",
        _names,
        "model names separated by commas",
        "a model that model code may name besides the configured ones and those a request's "
        "options name (repeatable); any other name it passes is refused",
        repeatable=True,
    ),
    Setting(
        "max_calls_in_flight",
        "ELIZA_RLM_MAX_CALLS_IN_FLIGHT",
        "16",
        _positive_int,
        "a positive integer",
        "model calls one request may have in flight at once; its other calls wait",
    ),
    Setting(
        "max_answer_bytes",
        "ELIZA_RLM_MAX_ANSWER_BYTES",
        str(64 << 20),
        _positive_int,
        "a positive number of bytes",
        "longest answer (UTF-8) a request may return before -32603 answer_too_large",
    ),
    Setting(
        "max_cost_usd",
        "ELIZA_RLM_MAX_COST_USD",
        "",
        _optional_usd,
        "a positive number of US dollars",
        "default cost limit of one request's whole call tree (unset: none)",
    ),
    Setting(
        "spend_limit_usd",
        "ELIZA_RLM_SPEND_LIMIT_USD",
        "",
        _optional_usd,
        "a positive number of US dollars",
        "cost limit over the server's lifetime (unset: none)",
    ),
    Setting(
        "log_dir",
        "ELIZA_RLM_LOG_DIR",
        "",
        _directory,
        "a directory we can create",
        "write one JSONL trajectory per request here (the rlm library's logger format)",
    ),
    Setting(
        "record",
        "ELIZA_RLM_RECORD",
        "",
        _directory,
        "a directory we can create",
        "store every model exchange here, keyed by a hash of the request",
    ),
    Setting(
        "replay",
        "ELIZA_RLM_REPLAY",
        "",
        _directory,
        "a directory we can create",
        "answer every model call from a --record directory: no network, no key",
    ),
    Setting(
        "sandbox",
        "ELIZA_RLM_SANDBOX",
        "auto",
        _choice(SANDBOX_LEVELS),
        "one of " + ", ".join(SANDBOX_LEVELS),
        "isolation of model code: strict (refuse to start without every protection), auto "
        "(every protection this machine has, warning of the rest), off (for remote REPLs)",
    ),
    Setting(
        "worker_memory_mb",
        "ELIZA_RLM_WORKER_MEMORY_MB",
        "8192",
        _non_negative_int,
        "a non-negative integer",
        "address space one worker may map beyond what it starts with (the zygote's, stored "
        "contexts included), in MiB (0: no limit)",
    ),
    Setting(
        "worker_disk_mb",
        "ELIZA_RLM_WORKER_DISK_MB",
        "1024",
        _non_negative_int,
        "a non-negative integer",
        "size of one worker's private directory, all its files together (a tmpfs: memory), "
        "in MiB (0: no limit)",
    ),
    Setting(
        "context_store_bytes",
        "ELIZA_RLM_CONTEXT_STORE_BYTES",
        str(8 << 30),
        _positive_int,
        "a positive number of bytes",
        "total size of the contexts loaded with context/load; the least recently used one "
        "that nothing uses is evicted to make room",
    ),
    Setting(
        "session_idle_s",
        "ELIZA_RLM_SESSION_IDLE_S",
        "600",
        _positive_float,
        "a positive number of seconds",
        "a session with no turn running or waiting for this long is closed",
        flag="--session-idle-s",
    ),
    Setting(
        "executor",
        "ELIZA_RLM_EXECUTOR",
        "local",
        _choice(EXECUTORS),
        "one of " + ", ".join(EXECUTORS),
        "where completions run: local (workers on this machine) or ray (workers on the nodes "
        "of a Ray cluster, pip install 'rlm-server[ray]'); ray,local runs them here when the "
        "cluster cannot be reached",
    ),
    Setting(
        "ray_address",
        "RAY_ADDRESS",
        "",
        _text,
        "a Ray cluster address",
        "the Ray cluster --executor ray connects to (the address `ray start --head` prints, "
        "or auto for the cluster this machine is a node of)",
    ),
    Setting(
        "ray_node_slots",
        "ELIZA_RLM_RAY_NODE_SLOTS",
        "0",
        _non_negative_int,
        "a non-negative integer",
        "completions one Ray node runs at once (0: as many as it has CPUs)",
    ),
    Setting(
        "allow_path",
        "ELIZA_RLM_ALLOW_PATH",
        "",
        _directories,
        "existing directories separated by commas",
        "rlm-server mcp: a directory whose files the tools may read (repeatable; none: no files)",
        repeatable=True,
    ),
    Setting(
        "max_read_bytes",
        "ELIZA_RLM_MAX_READ_BYTES",
        str(256 << 20),
        _positive_int,
        "a positive number of bytes",
        "rlm-server mcp: most bytes of files one tool call reads; files past it are skipped",
    ),
)


class Config(NamedTuple):
    backend: str
    model: str
    sub_model: str
    base_url: str
    environment: str
    max_iterations: int
    max_depth: int
    verbose: bool
    max_retries: int
    retry_delay_ms: float
    retry_max_delay_ms: float
    max_concurrency: int
    max_queue: int
    max_queue_bytes: int
    timeout_s: float
    strict: bool
    max_message_bytes: int
    shutdown_grace_s: float
    allow_base_url: tuple[str, ...]
    allow_model: tuple[str, ...]
    max_calls_in_flight: int
    max_answer_bytes: int
    max_cost_usd: float | None
    spend_limit_usd: float | None
    log_dir: str | None
    record: str | None
    replay: str | None
    sandbox: str
    worker_memory_mb: int
    worker_disk_mb: int
    context_store_bytes: int
    session_idle_s: float
    executor: str
    ray_address: str
    ray_node_slots: int
    allow_path: tuple[str, ...]
    max_read_bytes: int
    protections: tuple[str, ...] = ()  # not a setting: what the sandbox probe found in force

    @property
    def effective_model(self) -> str:
        return self.model or BACKEND_INFO[self.backend].default_model


def _flag(setting: Setting) -> str:
    if setting.flag is not None:
        return setting.flag
    return "--" + setting.name.removesuffix("_ms").removesuffix("_s").replace("_", "-")


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus a message on a bad flag; we promise one readable line.

    argparse also makes a help formatter for every flag it is given, only to check its
    metavar, and the default one asks shutil for the terminal's width each time (importing
    shutil, bz2 and lzma: a few ms of every start). Only help is printed at a width, so only
    `format_help` asks."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=_FixedWidthFormatter, **kwargs)

    def format_help(self) -> str:
        self.formatter_class = argparse.HelpFormatter
        return super().format_help()

    def error(self, message: str) -> Any:
        raise ConfigError(message)


class _FixedWidthFormatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=80)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="rlm-server",
        description="JSON-RPC 2.0 server on stdin/stdout that runs Recursive Language Models. "
        "Every flag overrides the environment variable named beside it.",
    )
    parser.add_argument("--version", action="version", version=f"rlm-server {__version__}")
    for setting in SETTINGS:
        switch = setting.parse is _bool
        parser.add_argument(
            _flag(setting),
            dest=setting.name,
            metavar="BOOL" if switch else "VALUE",
            nargs="?" if switch else None,
            const="true" if switch else None,
            action="append" if setting.repeatable else "store",
            help=f"{setting.help} [{setting.env}, default {setting.default or 'unset'}]",
        )
    return parser


def load_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Flags, then environment, then defaults; raises ConfigError naming the culprit."""
    args = build_parser().parse_args(list(argv))
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        flag_value = getattr(args, setting.name)
        if isinstance(flag_value, list):
            flag_value = ",".join(flag_value)
        source, raw = (
            (_flag(setting), flag_value)
            if flag_value is not None
            else (setting.env, environ[setting.env])
            if setting.env in environ
            else ("default", setting.default)
        )
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError:
            raise ConfigError(f"{source} must be {setting.expect}, got {raw!r}") from None
    config = Config(**values)
    if config.retry_max_delay_ms < config.retry_delay_ms:
        raise ConfigError("ELIZA_RLM_RETRY_MAX_DELAY must not be below ELIZA_RLM_RETRY_DELAY")
    if config.record and config.replay:
        raise ConfigError("--record and --replay cannot be used together")
    if config.executor != "local":
        _check_ray(config)
    return config


def _check_ray(config: Config) -> None:
    """--executor ray needs Ray installed and a cluster to connect to (we never start one)."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("--executor ray needs Ray: pip install 'rlm-server[ray]'")
    if not config.ray_address:
        raise ConfigError("--executor ray needs --ray-address or RAY_ADDRESS")


def backend_unavailable_reason(
    backend: str, base_url: str, environ: Mapping[str, str], replaying: bool = False
) -> str | None:
    """Why the backend cannot be used (the contract's stub mode), or None when it can. A
    server that replays recorded answers needs no endpoint and no key."""
    if importlib.util.find_spec("rlm") is None:
        return "the rlm library (PyPI: rlms) is not installed"
    if replaying:
        return None
    info = BACKEND_INFO[backend]
    if backend == "vllm" and not base_url:
        return "the vllm backend needs ELIZA_RLM_BASE_URL"
    if info.openai_compatible and base_url:
        return None  # a local OpenAI-compatible server usually needs no key
    if info.key_vars and not any(environ.get(var) for var in info.key_vars):
        return f"no credentials for backend {backend}: set {' or '.join(info.key_vars)}"
    return None


def api_key(backend: str, environ: Mapping[str, str]) -> str | None:
    for var in BACKEND_INFO[backend].key_vars:
        if environ.get(var):
            return environ[var]
    return None
