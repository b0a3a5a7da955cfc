"""`rlm-server view`: the trajectory report, read by Python and rendered by a real Chromium.

The browser tests open the generated page in Debian's Chromium (driven by Playwright, pointed at
the system binary) because a page that only looks right as a string can still fail to render,
throw, or run injected script. Without Chromium they skip with the reason, except under CI,
where `.ci/run` installs it and a skip would hide a broken check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest
from fixtures.openai_fixture import FixtureServer
from harness import repl

from rlm_server import cli
from rlm_server.tools import viewer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

FIXTURE = Path(__file__).parent / "fixtures" / "trajectory.jsonl"
SCREENSHOT_ENV = "RLM_VIEWER_SCREENSHOT"  # set to docs/viewer.png to refresh the README's image

# Strings a model (or a document in its context) could print. Each must show as text.
HOSTILE = {
    "script": '</script><script>window.__pwned = "script"</script>',
    "img": "<img src=x onerror=\"window.__pwned = 'img'\">",
    "attr": '"><svg onload="window.__pwned = \'svg\'">',
    "entity": "&lt;b&gt; stays literal & so does <b>this</b>",
}


def _records() -> list[dict[str, Any]]:
    lines = FIXTURE.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _write(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _sub_calls_per_iteration() -> dict[int, int]:
    return {
        r["iteration"]: sum(len(b["result"]["rlm_calls"]) for b in r["code_blocks"])
        for r in _records()
        if r["type"] == "iteration"
    }


def _hostile_records() -> list[dict[str, Any]]:
    """The fixture with a hostile string in every field the page shows."""
    records = _records()
    meta, first, last = records[0], records[1], records[-1]
    meta["query"] = HOSTILE["script"]
    meta["request_id"] = HOSTILE["attr"]
    first["response"] = HOSTILE["img"]
    block = first["code_blocks"][0]
    block["code"] = HOSTILE["script"]
    block["result"]["stdout"] = HOSTILE["img"]
    block["result"]["stderr"] = HOSTILE["attr"]
    block["result"]["locals"] = {HOSTILE["img"]: HOSTILE["script"]}
    block["result"]["rlm_calls"] = [
        {"root_model": HOSTILE["attr"], "prompt": HOSTILE["script"], "response": HOSTILE["img"]}
    ]
    last["text"] = HOSTILE["entity"]
    last["usage"]["models"] = {HOSTILE["img"]: {"calls": 1}}
    return records


# ---------------------------------------------------------------------------------------------
# Reading and rendering, without a browser.


def test_the_fixture_reads_completely() -> None:
    trajectory = viewer.load(FIXTURE)
    assert trajectory.problems == [] and trajectory.skipped == []
    assert [it.number for it in trajectory.iterations] == [1, 2, 3, 4, 5]
    assert trajectory.query is not None and "Marguerite" in trajectory.query
    assert trajectory.answer is not None and "14 March 1887" in trajectory.answer
    third = trajectory.iterations[2]
    assert [c.model for c in third.calls] == ["gpt-5-nano"] * 3
    assert third.sub_tokens == (612 + 598 + 604, 41 + 38 + 35)
    assert third.sub_cost is not None and third.sub_cost > 0


def test_the_chart_splits_each_iteration_s_time_without_losing_any() -> None:
    for it in viewer.load(FIXTURE).iterations:
        root, code, sub = viewer._time_split(it)
        assert min(root, code, sub) >= 0
        assert it.seconds is not None
        assert root + code + sub == pytest.approx(it.seconds)
    third = viewer.load(FIXTURE).iterations[2]
    assert viewer._time_split(third)[2] == pytest.approx(2.41 + 2.87 + 2.52)


def test_odd_lines_are_reported_on_the_page_not_fatal(tmp_path: Path) -> None:
    meta = _records()[0]
    lines = [
        json.dumps(meta),
        "{not json",
        "[1, 2]",
        json.dumps({"type": "progress", "event": "iteration"}),
        json.dumps({"type": "iteration"}),
        json.dumps({"type": "iteration", "code_blocks": "no", "iteration_time": "slow"}),
        json.dumps({"type": "iteration", "response": {"a": 1}, "code_blocks": [{"result": 3}]}),
        json.dumps(meta),
        "",
    ]
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    trajectory = viewer.load(path)
    assert len(trajectory.iterations) == 3
    assert trajectory.iterations[2].response == '{"a": 1}'
    page = viewer.render(trajectory)
    assert "line 2: not valid JSON" in page
    assert "line 3: not a JSON object" in page
    assert "line 4: type &#x27;progress&#x27;" in page
    assert "line 8: a second metadata line, ignored" in page
    assert page.count('class="iteration"') == 3


def test_an_empty_file_and_restarted_numbering_are_explained(tmp_path: Path) -> None:
    empty = viewer.render(viewer.load(_write(tmp_path / "empty.jsonl", [])))
    assert "no metadata line" in empty and "No iterations were logged." in empty
    iteration = _records()[1]
    twice = viewer.load(_write(tmp_path / "twice.jsonl", [iteration, iteration]))
    assert twice.problems[0].startswith("line 2: iteration numbers restart (1 then 1)")
    page = viewer.render(twice)
    assert 'id="iteration-1"' in page and 'id="iteration-2"' in page  # ids stay unique


def test_a_file_from_the_library_s_own_logger_opens(tmp_path: Path) -> None:
    """No query, request id or result line: the answer comes from the last iteration."""
    records = _records()[:-1]
    del records[0]["query"], records[0]["request_id"]
    records[1]["prompt"] = [{"role": "system", "content": "You are an RLM."}]
    trajectory = viewer.load(_write(tmp_path / "rlm_2026.jsonl", records))
    assert trajectory.result is None and trajectory.query is None
    assert trajectory.answer == records[-1]["final_answer"]
    page = viewer.render(trajectory)
    assert "The file does not record the question." in page
    assert "no result line" in page
    assert "prompt to the root model (1 messages)" in page
    assert "30.7 s in iterations" in page  # no result line: elapsed from the iterations
    assert "1,814 in / 114 out" in page  # sub-call tokens, summed over the file


def test_an_error_result_shows_the_error_and_no_answer(tmp_path: Path) -> None:
    records = _records()
    records[-1].update(
        outcome="error",
        text=None,
        error={"code": -32002, "message": "budget exceeded", "data": {"limit": "max_calls"}},
    )
    for record in records:
        record.pop("final_answer", None)
    page = viewer.render(viewer.load(_write(tmp_path / "failed.jsonl", records)))
    assert 'id="error"' in page and 'id="answer"' not in page
    assert '<span class="badge err">error</span>' in page
    assert "Error -32002: budget exceeded" in page and "max_calls" in page


def test_a_block_with_many_sub_calls_lists_them_folded(tmp_path: Path) -> None:
    records = _records()
    block = records[3]["code_blocks"][0]["result"]
    block["rlm_calls"] = block["rlm_calls"] * 2
    page = viewer.render(viewer.load(_write(tmp_path / "many.jsonl", records)))
    assert page.count('<details class="subcall">') == 6
    assert '<details class="subcall" open>' not in page
    assert "$0.000047" in page  # a sub-call's cost, without exponent notation


def test_hostile_strings_are_escaped_in_the_html(tmp_path: Path) -> None:
    page = viewer.render(viewer.load(_write(tmp_path / "hostile.jsonl", _hostile_records())))
    assert page.count("<script") == 1 and page.count("</script>") == 1  # the page's own
    for text in HOSTILE.values():
        assert text not in page
    assert "&lt;/script&gt;&lt;script&gt;" in page
    assert "&lt;img src=x onerror=" in page
    assert "&amp;lt;b&amp;gt;" in page


def test_rlm_server_view_writes_the_report_beside_the_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "request-7.jsonl"
    shutil.copy(FIXTURE, source)
    assert cli.main(["view", str(source)]) == 0
    report = tmp_path / "request-7.html"
    assert capsys.readouterr().out.strip() == str(report)
    assert "14 March 1887" in report.read_text(encoding="utf-8")


def test_python_m_rlm_server_view_takes_an_output_path(tmp_path: Path) -> None:
    report = tmp_path / "out" / "report.html"
    report.parent.mkdir()
    command = [sys.executable, "-m", "rlm_server", "view", str(FIXTURE), "-o", str(report)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert report.read_text(encoding="utf-8").startswith("<!doctype html>")


def test_an_unreadable_file_is_one_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["view", str(tmp_path / "missing.jsonl")]) == 1
    assert "rlm-server view:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# In a real browser.


def _no_browser(reason: str) -> NoReturn:
    """Skip with the reason shown; under CI the browser is installed, so its absence fails."""
    message = f"headless Chromium unavailable: {reason}"
    print(message, file=sys.stderr)
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        _no_browser("no `chromium` on PATH (apt-get install chromium; .ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        _no_browser(f"playwright is not installed ({error}); pip install -e '.[test]'")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable)
        yield launched
        launched.close()


class Opened:
    """A page with every console error, uncaught exception and non-file request it caused."""

    def __init__(self, browser: Browser, report: Path) -> None:
        self.page: Page = browser.new_page(viewport={"width": 1100, "height": 900})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(report.as_uri())

    def numbers(self, selector: str) -> list[int]:
        found = self.page.eval_on_selector_all(selector, "els => els.map(e => e.dataset.iteration)")
        return [int(n) for n in found]


def _report(tmp_path: Path, source: Path) -> Path:
    report = tmp_path / "report.html"
    assert viewer.main([str(source), "-o", str(report)]) == 0
    return report


def test_the_report_renders_in_chromium(browser: Browser, tmp_path: Path) -> None:
    opened = Opened(browser, _report(tmp_path, FIXTURE))
    page = opened.page
    assert "schooner Marguerite first enter the port" in page.inner_text("#question")
    assert "14 March 1887, from Paimpol" in page.inner_text("#answer")
    assert opened.numbers(".timeline > .iteration") == [1, 2, 3, 4, 5]
    assert opened.numbers("svg.chart g.row") == [1, 2, 3, 4, 5]
    for number, calls in _sub_calls_per_iteration().items():
        nested = page.locator(f'.iteration[data-iteration="{number}"] .codeblock .subcall')
        assert nested.count() == calls
    first_call = page.locator('.iteration[data-iteration="3"] .subcall > summary').first
    assert "gpt-5-nano" in first_call.inner_text() and "612 in / 41 out" in first_call.inner_text()
    assert page.locator(".iteration").first.is_visible()
    assert opened.errors == [], opened.errors
    assert opened.requests == [page.url]  # the page itself: nothing fetched from anywhere


def test_expand_and_collapse_all_reach_every_block(browser: Browser, tmp_path: Path) -> None:
    opened = Opened(browser, _report(tmp_path, FIXTURE))
    page, count_open = opened.page, "document.querySelectorAll('details[open]').length"
    total = page.locator("details").count()
    page.click("button[data-open='0']")
    assert page.evaluate(count_open) == 0
    page.click("button[data-open='1']")
    assert page.evaluate(count_open) == total > 20
    assert page.locator("#iteration-3 .subcall pre").first.is_visible()
    assert opened.errors == [], opened.errors


def test_hostile_strings_render_as_text_in_chromium(browser: Browser, tmp_path: Path) -> None:
    opened = Opened(browser, _report(tmp_path, _write(tmp_path / "h.jsonl", _hostile_records())))
    page = opened.page
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0
    assert page.locator("script").count() == 1
    assert page.locator("main svg").count() == 1  # only the chart
    assert page.inner_text("#question") == HOSTILE["script"]
    assert page.inner_text("#answer") == HOSTILE["entity"]
    code = page.locator("#iteration-1 details.code pre").inner_text()
    assert code == HOSTILE["script"]
    shown = page.inner_text("#iteration-1")
    for text in (HOSTILE["img"], HOSTILE["attr"]):
        assert text in shown
    assert opened.errors == [], opened.errors


def test_a_file_the_rlm_library_wrote_renders(
    llm: FixtureServer, browser: Browser, tmp_path: Path
) -> None:
    """The library's own logger (no query or result line, full prompts, locals) opens too."""
    from rlm import RLM
    from rlm.logger import RLMLogger

    code = repl("s = llm_query('the code in: ' + context)", "print(s)", "answer['content'] = s")
    llm.script.replace(
        [
            {"when": "sub", "reply": "It says <b>7-ALPHA</b>."},
            {"when": "root", "reply": code + "\n" + repl("answer['ready'] = True")},
        ]
    )
    backend = {"model_name": "scripted", "base_url": llm.base_url, "api_key": "k"}
    logger = RLMLogger(log_dir=str(tmp_path / "logs"))
    rlm = RLM(backend="openai", backend_kwargs=backend, max_iterations=3, logger=logger)
    rlm.completion("The launch code is 7-ALPHA.", root_prompt="What is the launch code?")
    (log,) = (tmp_path / "logs").glob("*.jsonl")
    assert viewer.load(log).problems == []
    opened = Opened(browser, _report(tmp_path, log))
    page = opened.page
    assert opened.numbers(".timeline > .iteration") == [1]
    assert "scripted" in page.inner_text(".subcall > summary")
    assert page.inner_text("#answer") == "It says <b>7-ALPHA</b>."
    assert "no result line" in page.inner_text("#notices")
    assert opened.errors == [], opened.errors


def test_a_screenshot_of_the_example_report(browser: Browser, tmp_path: Path) -> None:
    """Every iteration but the third folded, as a reader would, so its sub-calls show."""
    opened = Opened(browser, _report(tmp_path, FIXTURE))
    for number in (1, 2, 4, 5):
        opened.page.click(f"#iteration-{number} > summary")
    assert opened.numbers(".iteration[open]") == [3]
    target = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "viewer.png")
    png = opened.page.screenshot(path=target, full_page=True)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    assert opened.errors == [], opened.errors
