"""Configuration and per-request option resolution (pure functions, no processes)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from rlm_server.config import ConfigError, backend_unavailable_reason, load_config
from rlm_server.engine.api import InferOptions
from rlm_server.engine.broker import backoff_s
from rlm_server.engine.engine import RunSpec
from rlm_server.engine.metrics import Metrics, Outcome
from rlm_server.errors import InvalidParams


def test_defaults_are_the_plugins() -> None:
    config = load_config([], {})
    assert (config.backend, config.environment) == ("gemini", "local")
    assert (config.max_iterations, config.max_depth, config.max_retries) == (4, 1, 3)
    assert (config.retry_delay_ms, config.retry_max_delay_ms) == (1000, 30000)
    assert config.max_message_bytes == 1 << 30
    assert config.effective_model == "gemini-2.5-flash"


def test_flags_override_environment_which_overrides_defaults() -> None:
    env = {"ELIZA_RLM_MAX_ITERATIONS": "7", "ELIZA_RLM_STRICT": "yes", "ELIZA_RLM_MODEL": "m"}
    assert load_config([], env).max_iterations == 7
    assert load_config(["--max-iterations", "9"], env).max_iterations == 9
    assert load_config([], env).strict is True
    assert load_config(["--strict", "false"], env).strict is False
    assert load_config(["--strict"], {}).strict is True
    assert load_config([], env).effective_model == "m"


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1.5", ""])
def test_bad_integers_name_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="ELIZA_RLM_MAX_CONCURRENCY"):
        load_config([], {"ELIZA_RLM_MAX_CONCURRENCY": value})


def test_the_brokers_bounds_have_defaults_and_refuse_bad_values() -> None:
    config = load_config([], {})
    assert (config.allow_model, config.max_calls_in_flight) == ((), 16)
    assert config.max_answer_bytes == 64 << 20
    flags = ["--allow-model", "a", "--allow-model", "b, c", "--max-calls-in-flight", "4"]
    config = load_config(flags, {"ELIZA_RLM_ALLOW_MODEL": "ignored"})
    assert (config.allow_model, config.max_calls_in_flight) == (("a", "b", "c"), 4)
    assert load_config([], {"ELIZA_RLM_ALLOW_MODEL": "x,y"}).allow_model == ("x", "y")
    with pytest.raises(ConfigError, match="--max-calls-in-flight"):
        load_config(["--max-calls-in-flight", "0"], {})
    with pytest.raises(ConfigError, match="ELIZA_RLM_MAX_ANSWER_BYTES"):
        load_config([], {"ELIZA_RLM_MAX_ANSWER_BYTES": "lots"})


def test_the_worker_disk_limit_is_a_non_negative_number_of_mib() -> None:
    assert load_config([], {}).worker_disk_mb == 1024
    assert load_config(["--worker-disk-mb", "0"], {}).worker_disk_mb == 0  # no limit
    assert load_config([], {"ELIZA_RLM_WORKER_DISK_MB": "64"}).worker_disk_mb == 64
    for value in ("-1", "1.5", "lots"):
        with pytest.raises(ConfigError, match="--worker-disk-mb"):
            load_config(["--worker-disk-mb", value], {})


def test_retry_cap_below_the_first_delay_is_refused() -> None:
    with pytest.raises(ConfigError, match="RETRY_MAX_DELAY"):
        load_config([], {"ELIZA_RLM_RETRY_DELAY": "500", "ELIZA_RLM_RETRY_MAX_DELAY": "100"})


def test_availability() -> None:
    assert backend_unavailable_reason("gemini", "", {}) is not None
    assert backend_unavailable_reason("gemini", "", {"GOOGLE_API_KEY": "k"}) is None
    assert backend_unavailable_reason("openai", "http://127.0.0.1:1/v1", {}) is None
    assert "BASE_URL" in str(backend_unavailable_reason("vllm", "", {}))
    assert backend_unavailable_reason("vllm", "http://127.0.0.1:1/v1", {}) is None


def test_options_resolve_per_request_without_touching_the_configuration() -> None:
    config = load_config(["--backend", "openai", "--model", "base"], {"OPENAI_API_KEY": "k"})
    options = InferOptions(model="other", max_depth=3, temperature=0.5, sub_model="small")
    spec = RunSpec.resolve(config, options, {"OPENAI_API_KEY": "k"})
    kwargs = spec.rlm_kwargs
    assert kwargs["backend_kwargs"] == {"model_name": "other"}  # the worker: a model name only
    assert kwargs["max_depth"] == 3 and kwargs["max_iterations"] == 4
    assert kwargs["other_backend_kwargs"] == [{"model_name": "small"}]
    assert spec.route.kwargs["sampling_args"] == {"temperature": 0.5}
    assert spec.route.kwargs["api_key"] == "k"  # the broker's route, in the server only
    assert spec.route.models == ("other", "small")
    assert spec.route.allowed == {"other", "small", "base"}  # and --allow-model's: none here
    assert config.model == "base" and config.max_depth == 1


def test_switching_backend_drops_the_configured_model_and_url() -> None:
    config = load_config(
        ["--backend", "openai", "--model", "local", "--base-url", "http://127.0.0.1:1/v1"], {}
    )
    spec = RunSpec.resolve(config, InferOptions(backend="groq"), {"GROQ_API_KEY": "g"})
    assert spec.model == "llama-3.3-70b-versatile"
    assert spec.rlm_kwargs["backend"] == spec.route.backend == "openai"
    assert spec.route.kwargs["base_url"] == "https://api.groq.com/openai/v1"
    assert spec.route.kwargs["api_key"] == "g"
    assert "api_key" not in orjson.dumps(spec.rlm_kwargs).decode()


def test_a_per_request_base_url_is_refused_unless_allowed() -> None:
    env = {"OPENAI_API_KEY": "k"}
    config = load_config(["--backend", "openai", "--allow-base-url", "http://127.0.0.1:9/v1"], env)
    with pytest.raises(InvalidParams) as refused:
        RunSpec.resolve(config, InferOptions(base_url="http://attacker.invalid/v1"), env)
    assert refused.value.data["field"] == "options.base_url"
    allowed = RunSpec.resolve(config, InferOptions(base_url="http://127.0.0.1:9/v1/"), env)
    assert allowed.route.kwargs["base_url"] == "http://127.0.0.1:9/v1/"


def test_backoff_grows_with_jitter_under_the_cap() -> None:
    delays = [backoff_s(attempt, 100, 1000) for attempt in (1, 2, 3, 4, 5, 6)]
    assert 0.05 <= delays[0] < 0.1
    assert 0.1 <= delays[1] < 0.2
    assert all(0.5 <= d < 1.0 for d in delays[4:])


def test_metrics_add_up_and_percentiles_are_nearest_rank() -> None:
    metrics = Metrics()
    for value in range(1, 101):
        metrics.started()
        metrics.record(Outcome.SUCCESS if value % 10 else Outcome.FAILURE, float(value))
    snapshot = metrics.snapshot()
    assert snapshot["total_requests"] == 100
    assert (snapshot["successful_requests"], snapshot["failed_requests"]) == (90, 10)
    assert snapshot["latency_ms"] == {"avg": 50.5, "p50": 50.0, "p95": 95.0, "p99": 99.0}
    for _ in range(2000):
        metrics.record(Outcome.SUCCESS, 1.0)
    assert metrics.snapshot()["latency_ms"]["p99"] == 1.0  # a rolling window of 1000


def test_allow_path_is_repeatable_resolved_and_must_exist(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    other = tmp_path / "other"
    other.mkdir()
    assert load_config([], {}).allow_path == ()
    flags = ["--allow-path", str(tmp_path / "link"), "--allow-path", str(other)]
    assert load_config(flags, {}).allow_path == (str(tmp_path / "real"), str(other))
    env = {"ELIZA_RLM_ALLOW_PATH": f"{tmp_path / 'real'},{other}"}
    assert load_config([], env).allow_path == (str(tmp_path / "real"), str(other))
    with pytest.raises(ConfigError, match="--allow-path must be existing directories"):
        load_config(["--allow-path", str(tmp_path / "missing")], {})
