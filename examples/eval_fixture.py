"""`rlm-server eval` against a scripted model: the whole harness, offline, in one command.

    python examples/eval_fixture.py [--out DIR] [any rlm-server eval flag, e.g. --record DIR]

The model is the test suite's scripted OpenAI-compatible server (tests/fixtures/
openai_fixture.py), on 127.0.0.1, scripted here from the same seeded generators the harness
uses. As the RLM's root model it answers with Python that really reads the answer out of
`context` in the REPL (a regex for the needles, the message templates for the kinds of
messages). As the base model it answers right only when what the question needs is in its
prompt (the whole input was kept), and then counts off by two and names half of the pairs, so
that partial credit shows. Its scores measure the harness, not a model.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "scripted"
FALLBACK = "I cannot tell from the text."
VALUE = r"((?:Dr\. )?.+?)\.(?=\s|$)"  # a needle's value: up to the sentence's full stop
EXAMPLE_DEFAULTS = ["--sizes", "8k,32k,128k,512k", "--window", "100k", "--seeds", "3"]

Json = dict[str, Any]


def repl(*lines: str) -> str:
    """A root-model reply that runs these lines and answers with `result`."""
    code = [*lines, "answer['content'] = str(result)", "answer['ready'] = True"]
    return "```repl\n" + "\n".join(code) + "\n```"


def _templates() -> str:
    """Python source of a dict: each kind of message, as the regular expressions its
    templates make."""
    from rlm_server.tools.eval.tasks import MESSAGES

    patterns = {
        kind: [
            "^" + re.escape(t).replace(re.escape("{item}"), ".+").replace(re.escape("{n}"), r"\d+")
            for t in templates
        ]
        for kind, templates in MESSAGES.items()
    }
    return repr(patterns)


CLASSIFY = (
    "import re",
    "KINDS = {kind: [re.compile(p) for p in ps] for kind, ps in {templates}.items()}",
    "def kind_of(text):",
    "    return next(k for k, ps in KINDS.items() if any(p.match(text) for p in ps))",
    "rows = [line.split(' | ', 2) for line in context.splitlines()]",
    "kinds = [(user, kind_of(text)) for _, user, text in rows]",
)


def root_reply(task: Any) -> str:
    """What the scripted root model writes for this task's question."""
    from rlm_server.tools.eval.tasks import MESSAGES

    if task.name == "niah":
        phrase, entity = _asked(task)
        pattern = re.escape(f"The {phrase} for {entity} is ") + VALUE
        return repl("import re", f"result = re.search({pattern!r}, context).group(1)")
    if task.name == "multi-niah":
        phrase, _ = _asked(task)
        entities = [name for name, _ in task.expected]
        return repl(
            "import re",
            "found = []",
            f"for name in {entities!r}:",
            f"    before = re.escape('The {phrase} for ' + name + ' is ')",
            f"    m = re.search(before + {VALUE!r}, context)",
            "    found.append(name + ': ' + (m.group(1) if m else '?'))",
            "result = '\\n'.join(found)",
        )
    classify = [line.replace("{templates}", _templates()) for line in CLASSIFY]
    if task.name == "pairs":
        return repl(
            *classify,
            "praising = sorted({user for user, kind in kinds if kind == 'praise'})",
            "result = '\\n'.join(f'({a}, {b})' for i, a in enumerate(praising) "
            "for b in praising[i + 1:])",
        )
    if isinstance(task.expected, int):
        asked = task.question.split("How many ")[1].split(" are there")[0]
        wanted = next(kind for kind in MESSAGES if kind in asked)
        return repl(*classify, f"result = sum(kind == {wanted!r} for _, kind in kinds)")
    return repl(
        *classify,
        "from collections import Counter",
        "result = Counter(kind for _, kind in kinds).most_common(1)[0][0]",
    )


def base_rule(task: Any) -> Json:
    """The scripted base model: right (or partly right) only with the evidence in its prompt."""
    if task.name == "niah":
        evidence = [_needle_sentence(task, task.expected)]
        reply = str(task.expected)
    elif task.name == "multi-niah":
        evidence = [_needle_sentence(task, value, name) for name, value in task.expected]
        reply = "\n".join(f"{name}: {value}" for name, value in task.expected)
    else:  # the records tasks: the whole input, up to its last line, must be there
        evidence = [task.context.rsplit("\n", 1)[-1]]
        if task.name == "pairs":
            half = task.expected[: max(1, len(task.expected) // 2)]
            reply = "\n".join(f"({a}, {b})" for a, b in half)
        elif isinstance(task.expected, int):
            reply = str(task.expected + 2)
        else:
            reply = str(task.expected)
    return {"when": "sub", "contains": [task.question, *evidence], "reply": reply}


def _asked(task: Any) -> tuple[str, str]:
    """The needle phrase and the (first) project a needle question asks about."""
    found = re.search(r"is the (.+?) for (?:each of )?(\w+)", task.question)
    assert found is not None, task.question
    return found.group(1), found.group(2)


def _needle_sentence(task: Any, value: str, entity: str | None = None) -> str:
    phrase, named = _asked(task)
    return f"The {phrase} for {entity or named} is {value}."


def rules(tasks: list[Any]) -> list[Json]:
    """Root replies by question (code reads the answer from the context, so one serves every
    size); base replies larger inputs first (a smaller input of the same seed can be a prefix
    of a larger one)."""
    root: dict[str, Json] = {}
    for task in tasks:
        reply = root_reply(task)
        root.setdefault(reply, {"when": "root", "contains": task.question, "reply": reply})
    base = [base_rule(task) for task in sorted(tasks, key=lambda task: -task.size)]
    fallbacks = [
        {"when": "sub", "reply": FALLBACK},
        {"when": "root", "reply": repl(f"result = {FALLBACK!r}")},
    ]
    return [*root.values(), *base, *fallbacks]


def planned(argv: list[str]) -> list[Any]:
    """The tasks `rlm-server eval` will generate for these flags."""
    from rlm_server.tools.eval.cli import build_parser
    from rlm_server.tools.eval.tasks import generate

    args, _ = build_parser().parse_known_args(argv)
    return [
        generate(name, size, seed)
        for name in args.tasks
        for size in sorted(set(args.sizes))
        for seed in range(args.seeds)
    ]


def server_command() -> list[str]:
    script = shutil.which("rlm-server")
    return [script] if script else [sys.executable, "-m", "rlm_server"]


def run(argv: list[str], **subprocess_args: Any) -> subprocess.CompletedProcess[Any]:
    """`rlm-server eval` with `argv` (after the example's defaults) against the scripted model."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.openai_fixture import FixtureServer

    argv = [*EXAMPLE_DEFAULTS, *argv]
    server = FixtureServer(rules=rules(planned(argv)))
    server.start_in_thread()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELIZA_RLM_")}
    env = {k: v for k, v in env.items() if not k.endswith("_API_KEY")}
    env.update(
        {
            "ELIZA_RLM_BACKEND": "openai",
            "ELIZA_RLM_BASE_URL": server.base_url,
            "ELIZA_RLM_MODEL": MODEL,
        }
    )
    try:
        return subprocess.run(
            [*server_command(), "eval", *argv], env=env, check=False, **subprocess_args
        )
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    raise SystemExit(run(sys.argv[1:]).returncode)
