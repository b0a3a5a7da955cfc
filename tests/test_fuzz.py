"""A deterministic fuzz: 20,000 mixed lines against one real server, which must answer each as
JSON-RPC 2.0 says and serve on.

The lines are valid requests, hostile ones (any JSON value in any member, most of them short
and holding `status`, which a server may read on a path of its own), truncated lines, bytes
that are not JSON, lone surrogates and ids past 64 bits, lines over the size limit, batches of
all of these, notifications, infers and cancels of them. The first lines are written before the
server has said `ready`, so they meet it before its event loop runs. `expected` below is the
JSON-RPC 2.0 rulebook applied to each line as sent: which ids are owed an answer, and how many
answers carry `"id": null`. The harness validates every line the server writes against
protocol/schema.json.
"""

from __future__ import annotations

import collections
import itertools
import json
import queue
import random
import time
from collections.abc import Callable
from typing import Any

import orjson
from fixtures.openai_fixture import FixtureServer
from harness import ServerProcess, answer_with, fixture_env

LINES = 20_000
SEED = 20
MAX_MESSAGE_BYTES = 16_384
EARLY_LINES = 500  # written before `ready` is read
CHUNK_LINES = 250
WAIT_S = 180

Json = dict[str, Any]


class Expected:
    """What the lines sent so far are owed: each valid id once, and a number of null ids."""

    def __init__(self) -> None:
        self.ids: set[Any] = set()
        self.nulls = 0

    def line(self, raw: bytes) -> None:
        """JSON-RPC 2.0 and protocol/README.md's framing rules, applied to one line."""
        if not raw or raw.isspace():
            return
        if len(raw) > MAX_MESSAGE_BYTES:
            self._owe(_leading_id(raw))
            return
        try:
            message = json.loads(raw)  # the standard's reading: lone surrogates, big integers
        except ValueError:
            self.nulls += 1
            return
        if isinstance(message, list):
            if not message:
                self.nulls += 1
            for element in message:
                self._element(element)
        else:
            self._element(message)

    def _element(self, message: Any) -> None:
        if not isinstance(message, dict):
            self.nulls += 1
        elif "id" in message:
            self._owe(message["id"] if _valid_id(message["id"]) else None)
        elif (
            message.get("jsonrpc") != "2.0"
            or not isinstance(message.get("method"), str)
            or not isinstance(message.get("params"), dict | list | None)
        ):
            self.nulls += 1  # an invalid notification is answered, with a null id

    def _owe(self, request_id: Any) -> None:
        if request_id is None:
            self.nulls += 1
        else:
            assert request_id not in self.ids, f"the generator reused id {request_id!r}"
            self.ids.add(request_id)


def _valid_id(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**64


def _leading_id(raw: bytes) -> Any:
    """Only what `_oversized` writes: `{"jsonrpc":"2.0","id":<id>,...` or no id first."""
    prefix = b'{"jsonrpc":"2.0","id":'
    if not raw.startswith(prefix):
        return None
    return orjson.loads(raw[len(prefix) : raw.index(b",", len(prefix))])


class Lines:
    """The fuzz's lines, from one seed."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self._ids = itertools.count(1)
        self.infers: list[Any] = []  # ids of infers sent, for cancels to name

    def fresh_id(self) -> Any:
        number = next(self._ids)
        return number if self.random.random() < 0.5 else f"{number}status"

    def value(self, depth: int = 0) -> Any:
        """Any JSON value: every type, nested a little."""
        kinds: list[Callable[[], Any]] = [
            lambda: None,
            lambda: self.random.random() < 0.5,
            lambda: self.random.randint(-(2**63), 2**64 - 1),
            lambda: self.random.uniform(-1e6, 1e6),
            lambda: self.random.choice(["", "status", "2.0", "infer", "\u00e9\u2603", "\x00"]),
        ]
        if depth < 2:
            kinds.append(lambda: [self.value(depth + 1) for _ in range(self.random.randint(0, 3))])
            kinds.append(
                lambda: {
                    self.random.choice(["status", "id", "method", "prompt", "x"]): self.value(
                        depth + 1
                    )
                    for _ in range(self.random.randint(0, 3))
                }
            )
        return self.random.choice(kinds)()

    def loose(self) -> Any:
        """Any JSON value, each valid id that may be read as a request's made fresh (a dict
        is a request, and a list a batch)."""
        value = self.value()
        for element in value if isinstance(value, list) else [value]:
            if isinstance(element, dict) and _valid_id(element.get("id")):
                element["id"] = self.fresh_id()
        return value

    def status(self) -> Json:
        message: Json = {"jsonrpc": "2.0", "method": "status"}
        if self.random.random() < 0.9:
            message["id"] = self.fresh_id()
        if self.random.random() < 0.2:
            message["params"] = self.random.choice([None, {}, {"x": 1}, [], "status"])
        return message

    def hostile(self) -> Json:
        """Any JSON value in any member; never a method that stops the server or does work."""
        message: Json = {}
        for member in ("jsonrpc", "id", "method", "params"):
            roll = self.random.random()
            if roll < 0.25:
                continue
            if member == "id" and roll < 0.6:
                message["id"] = self.fresh_id()
            elif member == "jsonrpc" and roll < 0.6:
                message["jsonrpc"] = "2.0"
            elif member == "method" and roll < 0.5:
                message["method"] = self.random.choice(
                    ["status", "status ", "", "nonsense", "context/list", "$/cancelRequest"]
                )
            else:
                message[member] = self.value()
        if _valid_id(message.get("id")):
            message["id"] = self.fresh_id()  # any valid id is owed an answer: never reuse one
        if message.get("method") == "$/cancelRequest" and "id" not in message:
            message["params"] = {"id": self.value()}  # cancels nothing sent: ids are fresh
        if self.random.random() < 0.7:
            message["note"] = "status"  # other members are ignored; short lines with the word
        return message

    def infer(self) -> Json:
        request_id = self.fresh_id()
        self.infers.append(request_id)
        return {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "infer",
            "params": {"prompt": "status report", "query": "status?"},
        }

    def cancel(self) -> Json:
        target = self.random.choice(self.infers) if self.infers else self.value()
        message: Json = {"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": target}}
        if self.random.random() < 0.2:
            message["id"] = self.fresh_id()
        return message

    def element(self) -> Any:
        roll = self.random.random()
        if roll < 0.4:
            return self.status()
        if roll < 0.9:
            return self.hostile()
        return self.loose()

    def lone_surrogate(self) -> bytes:
        """A line with an escaped lone surrogate, as JavaScript writes one (a server may read
        it with a second parser), now and then with an id just past 64 bits."""
        message = self.random.choice([self.status(), self.hostile()])
        if self.random.random() < 0.5:
            message["id"] = self.random.choice([2**64, -(2**63) - 1, 2**70])
        message["u"] = "\ud800"
        return json.dumps(message, separators=(",", ":")).encode()

    def oversized(self) -> bytes:
        pad = "status" * (MAX_MESSAGE_BYTES // 6 + 1)
        if self.random.random() < 0.5:
            message = {"jsonrpc": "2.0", "id": self.fresh_id(), "method": "status", "pad": pad}
        else:
            message = {"method": "status", "jsonrpc": "2.0", "pad": pad}
        return orjson.dumps(message)

    def line(self) -> bytes:
        roll = self.random.random()
        if roll < 0.3:
            return orjson.dumps(self.status())
        if roll < 0.6:
            return orjson.dumps(self.hostile())
        if roll < 0.7:
            batch = [self.element() for _ in range(self.random.randint(0, 5))]
            return orjson.dumps(batch)
        if roll < 0.8:
            whole = orjson.dumps(self.random.choice([self.status(), self.hostile()]))
            return whole[: self.random.randint(1, len(whole) - 1)]  # a prefix of an object
        if roll < 0.88:
            noise = self.random.randbytes(self.random.randint(0, 40))
            return b"#" + noise.replace(b"\n", b" ").replace(b"\\", b"/")
        if roll < 0.95:
            return orjson.dumps(self.loose())
        if roll < 0.96:
            return self.oversized()
        if roll < 0.965:
            return orjson.dumps(self.infer())
        if roll < 0.97:
            return orjson.dumps(self.cancel())
        if roll < 0.985:
            return self.lone_surrogate()
        return self.random.choice([b"", b"  ", b"\t", b"[]", b"[[]]", b"{", b"null"])


def _answered(message: Any) -> list[Any]:
    """The ids that one line of the server answers (a response, or a batch of them)."""
    responses = message if isinstance(message, list) else [message]
    assert all("method" not in response for response in responses), f"not a response: {message}"
    return [response["id"] for response in responses]


def _next_while_alive(server: ServerProcess, deadline: float) -> Any:
    while time.monotonic() < deadline:
        try:
            return server.messages.get(timeout=0.2)
        except queue.Empty:
            code = server.process.poll()
            assert code is None, f"the server exited ({code}); stderr: {server.stderr_lines[-5:]}"
    raise AssertionError(f"answers still owed after {WAIT_S}s; stderr: {server.stderr_lines[-5:]}")


def _send(server: ServerProcess, lines: list[bytes]) -> None:
    try:
        server.send_raw(b"".join(raw + b"\n" for raw in lines))
    except BrokenPipeError:
        raise AssertionError(f"the server exited; stderr: {server.stderr_lines[-5:]}") from None


def test_twenty_thousand_mixed_lines_against_one_server() -> None:
    llm = FixtureServer(rules=[{"when": "root", "reply": answer_with("context[:6]")}])
    llm.start_in_thread()
    env = fixture_env(llm.base_url, ELIZA_RLM_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES))
    server = ServerProcess(env)
    try:
        lines = Lines(SEED)
        expected = Expected()
        sent = [lines.line() for _ in range(LINES)]
        for raw in sent:
            expected.line(raw)
        _send(server, sent[:EARLY_LINES])
        assert server.ready()["available"]
        for start in range(EARLY_LINES, LINES, CHUNK_LINES):
            _send(server, sent[start : start + CHUNK_LINES])

        answered: collections.Counter[Any] = collections.Counter()
        deadline = time.monotonic() + WAIT_S
        while not expected.ids <= answered.keys():
            answered.update(_answered(_next_while_alive(server, deadline)))
        assert len(expected.ids) > LINES // 3  # the generator is not degenerate
        server.request("last", "status")  # alive and serving after all of it
        while "last" not in answered:
            answered.update(_answered(_next_while_alive(server, deadline)))
        assert server.close() == 0
        while not server.messages.empty():  # anything written after the last owed answer
            answered.update(_answered(server.messages.get()))
    finally:
        server.kill()
        llm.shutdown()
        llm.server_close()

    nulls = answered.pop(None, 0)
    twice = {request_id: n for request_id, n in answered.items() if n > 1}
    assert not twice, f"answered more than once: {twice}"
    assert answered.keys() == expected.ids | {"last"}, answered.keys() ^ expected.ids
    assert nulls == expected.nulls
