"""Stored contexts: context/load (text, list, chunks), context/drop, context/list, and infer with
context_id, against the real server and the scripted model. Nothing here times anything."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import Spawn
from fixtures.openai_fixture import FixtureServer
from harness import (
    VALIDATOR,
    ServerProcess,
    alive,
    answer_with,
    descendants,
    parent_of,
    repl,
    wait_until,
    zygote_of,
)

ECHO = [{"when": "root", "reply": answer_with("context")}]
DESCRIBE = [{"when": "root", "reply": answer_with("type(context).__name__ + str(len(context))")}]
HELD_ECHO = [{"when": "root", "hold": True, "reply": answer_with("context[:12]")}]


def _load(server: ServerProcess, **params: Any) -> dict[str, Any]:
    response = server.call("context/load", params)
    assert "result" in response, response
    return response["result"]  # type: ignore[no-any-return]


def _ask(server: ServerProcess, context_id: str, **params: Any) -> dict[str, Any]:
    return server.call("infer", {"context_id": context_id, "query": "what?", **params})


def _invalid(response: dict[str, Any], field: str) -> None:
    error = response["error"]
    assert (error["code"], error["data"]["type"], error["data"]["field"]) == (
        -32602,
        "invalid_params",
        field,
    ), response


def _listed(server: ServerProcess) -> dict[str, Any]:
    return server.call("context/list")["result"]  # type: ignore[no-any-return]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_load_ask_twice_list_and_drop(spawn: Spawn) -> None:
    text = "Dépêche: the launch code is 7-ALPHA. " * 3
    server = spawn(ECHO)
    server.ready()
    loaded = _load(server, text=text)
    assert loaded["context_id"].startswith("ctx-")
    assert loaded == {
        "context_id": loaded["context_id"],
        "bytes": len(text.encode()),
        "sha256": _sha256(text.encode()),
        "sealed": True,
    }
    context_id = loaded["context_id"]
    for _ in range(2):
        assert _ask(server, context_id)["result"]["text"] == text

    listing = _listed(server)
    assert listing["bytes_total"] == len(text.encode())
    assert listing["bytes_limit"] == 8 << 30
    [entry] = listing["contexts"]
    assert entry["id"] == context_id and entry["uses"] == 0
    assert entry["sha256"] == loaded["sha256"] and isinstance(entry["last_used_ms"], int)

    assert server.call("context/drop", {"context_id": context_id})["result"] == {"dropped": True}
    assert server.call("context/drop", {"context_id": context_id})["result"] == {"dropped": False}
    assert _listed(server) == {"contexts": [], "bytes_total": 0, "bytes_limit": 8 << 30}
    _invalid(_ask(server, context_id), "context_id")
    assert server.close() == 0


def test_ids_are_not_guessable(spawn: Spawn) -> None:
    server = spawn(ECHO)
    server.ready()
    ids = [_load(server, text=str(n))["context_id"] for n in range(3)]
    assert len(set(ids)) == 3
    assert all(len(i) == len("ctx-") + 32 for i in ids)
    assert len({i[4:8] for i in ids}) == 3  # random, not counted
    assert server.close() == 0


def test_a_chunked_load_counts_utf8_bytes_and_seals_on_final(spawn: Spawn) -> None:
    chunks = ["héllo ", "wörld €", " 𝄞 and ", "done"]  # 2-, 3- and 4-byte characters
    whole = "".join(chunks).encode()
    server = spawn(ECHO)
    server.ready()
    first = _load(server, chunk=chunks[0])
    context_id = first["context_id"]
    assert first == {
        "context_id": context_id,
        "bytes": len(chunks[0].encode()),
        "sha256": None,
        "sealed": False,
    }
    _invalid(_ask(server, context_id), "context_id")  # not sealed yet
    assert _listed(server)["contexts"] == []  # only sealed ones are listed
    assert _listed(server)["bytes_total"] == len(chunks[0].encode())
    written = len(chunks[0].encode())
    for chunk in chunks[1:-1]:
        written += len(chunk.encode())
        result = _load(server, chunk=chunk, context_id=context_id)
        assert (result["bytes"], result["sealed"]) == (written, False)
    last = _load(server, chunk=chunks[-1], context_id=context_id, final=True)
    assert last == {
        "context_id": context_id,
        "bytes": len(whole),
        "sha256": _sha256(whole),
        "sealed": True,
    }
    assert _ask(server, context_id)["result"]["text"] == "".join(chunks)
    _invalid(server.call("context/load", {"chunk": "more", "context_id": context_id}), "context_id")
    _invalid(server.call("context/load", {"chunk": "x", "context_id": "ctx-unknown"}), "context_id")
    assert server.close() == 0


def test_one_chunk_can_be_first_and_final(spawn: Spawn) -> None:
    server = spawn(ECHO)
    server.ready()
    loaded = _load(server, chunk="all at once", final=True)
    assert loaded["sealed"] and loaded["sha256"] == _sha256(b"all at once")
    assert _ask(server, loaded["context_id"])["result"]["text"] == "all at once"
    assert server.close() == 0


def test_an_empty_text_is_a_context(spawn: Spawn) -> None:
    server = spawn(DESCRIBE)
    server.ready()
    loaded = _load(server, text="")
    assert (loaded["bytes"], loaded["sha256"]) == (0, _sha256(b""))
    assert _ask(server, loaded["context_id"])["result"]["text"] == "str0"
    assert server.close() == 0


@pytest.mark.parametrize(
    ("value", "answer"),
    [
        ([{"role": "user", "content": "first"}, {"role": "assistant", "content": "second"}], "2"),
        (["document one", "document two", "three"], "3"),
        ([1, 2.5, None, True, {"a": [1]}, "mixed"], "6"),
        ([{"role": "user", "content": "a message"}, "then a document", 3], "3"),
    ],
    ids=["messages", "documents", "any-json", "messages-then-others"],
)
def test_a_list_context_is_a_list_in_the_repl(spawn: Spawn, value: list[Any], answer: str) -> None:
    server = spawn([{"when": "root", "reply": answer_with("str(len(context)) + repr(context)")}])
    server.ready()
    loaded = _load(server, messages=value)
    assert loaded["bytes"] == len(orjson.dumps(value))
    assert loaded["sha256"] == _sha256(orjson.dumps(value))
    assert _ask(server, loaded["context_id"])["result"]["text"] == answer + repr(value)
    assert server.close() == 0


def test_the_least_recently_used_unused_context_is_evicted(spawn: Spawn) -> None:
    server = spawn(DESCRIBE, args=["--context-store-bytes", "100"])
    server.ready()
    a = _load(server, text="a" * 40)["context_id"]
    b = _load(server, text="b" * 40)["context_id"]
    assert _ask(server, a)["result"]["text"] == "str40"  # a is now the more recent
    c = _load(server, text="c" * 40)["context_id"]
    assert [e["id"] for e in _listed(server)["contexts"]] == [a, c]
    assert _listed(server)["bytes_total"] == 80
    _invalid(_ask(server, b), "context_id")
    assert server.call("context/drop", {"context_id": b})["result"] == {"dropped": False}

    too_big = server.call("context/load", {"text": "d" * 101})
    assert too_big["error"] == {
        "code": -32005,
        "message": "Context store full",
        "data": {"type": "context_store_full", "limit_bytes": 100},
    }
    assert [e["id"] for e in _listed(server)["contexts"]] == [a, c]  # nothing evicted for it
    assert server.close() == 0


def test_a_context_in_use_is_not_evicted_and_a_drop_waits_for_its_requests(
    spawn: Spawn, llm: FixtureServer
) -> None:
    server = spawn(HELD_ECHO, args=["--context-store-bytes", "100"])
    server.ready()
    used = _load(server, text="kept context " * 5)["context_id"]  # 65 bytes
    server.request("held", "infer", {"context_id": used})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1, timeout=30)
    assert _listed(server)["contexts"][0]["uses"] == 1

    refused = server.call("context/load", {"text": "x" * 60})
    assert refused["error"]["data"]["type"] == "context_store_full"
    assert server.call("context/drop", {"context_id": used})["result"] == {"dropped": True}
    listing = _listed(server)
    assert listing["contexts"] == [] and listing["bytes_total"] == 65  # still held
    _invalid(_ask(server, used), "context_id")

    llm.script.released.set()
    held = server.next_response()
    assert held["id"] == "held" and held["result"]["text"] == "kept context"
    assert _listed(server)["bytes_total"] == 0  # released with its last use
    assert "result" in server.call("context/load", {"text": "x" * 60})
    assert server.close() == 0


def _memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return fields


def _holder(server_pid: int) -> int:
    """The zygote's child that holds a stored context: unlike a worker's keeper, it leads no
    process group of its own."""
    zygote = zygote_of(server_pid)
    [holder] = [
        p for p in alive(descendants(zygote)) if parent_of(p) == zygote and os.getpgid(p) != p
    ]
    return holder


def test_concurrent_questions_share_one_copy_of_the_context(
    spawn: Spawn, llm: FixtureServer
) -> None:
    """Eight questions on one 32 MiB context at once: every worker process maps it, none
    copied it."""
    size_kib = 32 << 10
    text = "0123456789abcdef" * (size_kib * 1024 // 16)
    server = spawn(HELD_ECHO, args=["--max-concurrency", "8"])
    server.ready()
    context_id = _load(server, text=text)["context_id"]
    for n in range(8):
        server.request(n, "infer", {"context_id": context_id})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 8, timeout=60)
    # every process below the context's holder: a worker's keeper, and its init and job when
    # the sandbox gives it a PID namespace; all forked from the holder, and none may have copied
    # the context
    workers = list(alive(descendants(_holder(server.process.pid))))
    assert len(workers) >= 8
    for pid in workers:
        memory = _memory_kib(pid)
        assert memory["Rss"] > size_kib, memory  # it has the context...
        assert memory["Private_Dirty"] < size_kib // 4, memory  # ...and did not copy it
    llm.script.released.set()
    answers = server.responses_by_id(8)
    assert {r["result"]["text"] for r in answers.values()} == {"0123456789ab"}
    assert server.close() == 0


def test_a_replaced_zygote_reads_the_context_again(spawn: Spawn) -> None:
    server = spawn(ECHO)
    server.ready()
    context_id = _load(server, text="survives the zygote")["context_id"]
    assert _ask(server, context_id)["result"]["text"] == "survives the zygote"
    zygote = zygote_of(server.process.pid)
    os.kill(zygote, 9)
    assert wait_until(lambda: not alive([zygote]))
    assert _ask(server, context_id)["result"]["text"] == "survives the zygote"
    assert server.close() == 0


def test_the_context_file_is_private_and_removed_when_dropped(spawn: Spawn, tmp_path: Path) -> None:
    server = spawn(ECHO, env={"TMPDIR": str(tmp_path)})
    server.ready()
    context_id = _load(server, text="secret")["context_id"]
    [path] = tmp_path.glob(f"rlm-server-*/contexts/{context_id}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_bytes() == b"secret"
    assert server.call("context/drop", {"context_id": context_id})["result"]["dropped"]
    assert not path.exists()
    assert server.close() == 0
    assert not list(tmp_path.glob("rlm-server-*"))  # the server's directory goes at exit


def test_status_counts_contexts_and_sessions(spawn: Spawn) -> None:
    server = spawn(ECHO)
    server.ready()
    status = server.call("status")["result"]
    assert (status["contexts"], status["sessions"]) == ({"count": 0, "bytes": 0}, {"count": 0})
    _load(server, text="12345")
    _load(server, chunk="678")  # being loaded: counted in bytes, not listed
    server.call("session/open")
    status = server.call("status")["result"]
    assert (status["contexts"], status["sessions"]) == ({"count": 1, "bytes": 8}, {"count": 1})
    assert server.close() == 0


def _bad(method: str, params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": "bad", "method": method, "params": params}


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("context/load", {}, "text"),
        ("context/load", {"text": None}, "text"),
        ("context/load", {"text": 5}, "text"),
        ("context/load", {"text": ["a"]}, "text"),
        ("context/load", {"messages": "a"}, "messages"),
        ("context/load", {"messages": {"a": 1}}, "messages"),
        ("context/load", {"chunk": 1.5}, "chunk"),
        ("context/load", {"chunk": {}}, "chunk"),
        ("context/load", {"text": "a", "messages": []}, "messages"),
        ("context/load", {"text": "a", "chunk": "b"}, "chunk"),
        ("context/load", {"text": "a", "context_id": "ctx-1"}, "context_id"),
        ("context/load", {"text": "a", "final": True}, "final"),
        ("context/load", {"messages": [], "final": False}, "final"),
        ("context/load", {"chunk": "a", "context_id": 7}, "context_id"),
        ("context/load", {"chunk": "a", "context_id": []}, "context_id"),
        ("context/load", {"chunk": "a", "final": "yes"}, "final"),
        ("context/load", {"chunk": "a", "final": 1}, "final"),
        ("context/load", {"chunk": "a", "extra": 1}, "extra"),
        ("context/drop", {}, "context_id"),
        ("context/drop", {"context_id": None}, "context_id"),
        ("context/drop", {"context_id": 12}, "context_id"),
        ("context/drop", {"context_id": {"id": "x"}}, "context_id"),
        ("context/drop", {"context_id": "x", "force": True}, "force"),
        ("context/list", {"all": True}, "all"),
        ("context/list", [], "params"),
        ("infer", {"context_id": 5}, "context_id"),
        ("infer", {"context_id": ["ctx"]}, "context_id"),
        ("infer", {"context_id": "ctx-none"}, "context_id"),
        ("infer", {"context_id": ""}, "context_id"),
        ("infer", {"context_id": "ctx-none", "prompt": "x"}, "context_id"),
        ("infer", {"context_id": "ctx-none", "messages": []}, "context_id"),
        ("infer", {"query": "q"}, "prompt"),
        ("infer", {"context_id": None}, "prompt"),
        ("infer", {"context_id": "", "query": 3}, "query"),
        ("infer", {"context_id": "x", "options": {"max_depth": 0}}, "options.max_depth"),
    ],
)
def test_bad_params_get_a_clean_error_and_the_server_keeps_serving(
    spawn: Spawn, method: str, params: Any, field: str
) -> None:
    server = spawn(ECHO)
    server.ready()
    server.send(_bad(method, params))
    response = server.next_response()
    assert response["id"] == "bad"
    _invalid(response, field)
    assert server.call("status")["result"]["contexts"]["count"] == 0
    assert server.close() == 0


def test_a_load_sent_as_a_notification_is_not_run(spawn: Spawn) -> None:
    server = spawn(ECHO)
    server.ready()
    server.send({"jsonrpc": "2.0", "method": "context/load", "params": {"text": "lost"}})
    server.send({"jsonrpc": "2.0", "method": "context/list"})  # a report: nothing to do
    assert _listed(server) == {"contexts": [], "bytes_total": 0, "bytes_limit": 8 << 30}
    assert server.close() == 0


def _client_message_errors(message: Any) -> list[str]:
    schema = {"$ref": "#/$defs/ClientMessage", "$defs": VALIDATOR.schema["$defs"]}
    return [e.message for e in type(VALIDATOR)(schema).iter_errors(message)]


@pytest.mark.parametrize(
    ("params", "valid"),
    [
        ({"context_id": "ctx-1", "query": "q"}, True),
        ({"session_id": "ses-1", "query": "q"}, True),
        ({"session_id": "ses-1", "prompt": "new input"}, True),
        ({"session_id": "ses-1", "messages": [{"role": "user", "content": "x"}]}, True),
        ({"prompt": "x"}, True),
        ({"context_id": "ctx-1", "prompt": "x"}, False),
        ({"context_id": "ctx-1", "session_id": "ses-1"}, False),
        (
            {"session_id": "ses-1", "prompt": "x", "messages": [{"role": "u", "content": "x"}]},
            False,
        ),
        ({"query": "q"}, False),
        ({"context_id": 1}, False),
    ],
)
def test_the_schema_describes_infer_params(params: dict[str, Any], valid: bool) -> None:
    message = {"jsonrpc": "2.0", "id": 1, "method": "infer", "params": params}
    assert (not _client_message_errors(message)) is valid


@pytest.mark.parametrize(
    ("method", "params", "valid"),
    [
        ("context/load", {"text": "x"}, True),
        ("context/load", {"messages": [1, "two", {"three": 3}]}, True),
        ("context/load", {"chunk": "x"}, True),
        ("context/load", {"chunk": "x", "context_id": "ctx-1", "final": True}, True),
        ("context/load", {"text": "x", "chunk": "y"}, False),
        ("context/load", {"text": "x", "final": True}, False),
        ("context/load", {"messages": [], "context_id": "ctx-1"}, False),
        ("context/load", {}, False),
        ("context/drop", {"context_id": "ctx-1"}, True),
        ("context/drop", {}, False),
        ("context/list", {}, True),
        ("context/list", {"x": 1}, False),
        ("session/open", {}, True),
        ("session/open", {"context_id": "ctx-1"}, True),
        ("session/open", {"context_id": 1}, False),
        ("session/close", {"session_id": "ses-1"}, True),
        ("session/close", {}, False),
    ],
)
def test_the_schema_describes_the_new_methods(method: str, params: Any, valid: bool) -> None:
    message = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    assert (not _client_message_errors(message)) is valid


def test_a_worker_collecting_garbage_does_not_copy_a_list_context(
    spawn: Spawn, llm: FixtureServer
) -> None:
    """A list context is made of objects the garbage collector tracks: a full collection in a
    worker must not write to (and so copy) the zygote's."""
    documents = [{"n": n, "text": f"document {n}"} for n in range(200_000)]
    server = spawn(
        [
            {"when": "root", "times": 1, "reply": repl("collected = __import__('gc').collect()")},
            {"when": "root", "hold": True, "reply": answer_with("str(len(context))")},
        ]
    )
    server.ready()
    context_id = _load(server, messages=documents)["context_id"]
    server.request("collect", "infer", {"context_id": context_id})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1, timeout=60)  # collected
    holder = _holder(server.process.pid)
    assert _memory_kib(holder)["Rss"] > 60 << 10  # it holds the list
    for pid in alive(descendants(holder)):
        assert _memory_kib(pid)["Private_Dirty"] < 16 << 10, _memory_kib(pid)
    llm.script.released.set()
    assert server.next_response()["result"]["text"] == "200000"
    assert server.close() == 0


def _memory_holds(pid: int, needle: bytes) -> bool:
    """Whether any readable mapping of the process holds `needle` (read from outside: root
    may read any process's memory)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or line.rstrip().endswith(("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(part, 16) for part in span.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except OSError:
                continue
    return False


@pytest.mark.skipif(os.geteuid() != 0, reason="reading a worker's memory from outside needs root")
def test_a_worker_holds_its_own_context_and_no_other(spawn: Spawn, llm: FixtureServer) -> None:
    """Model code steered by one context must not find another in its own memory: a worker on
    context A is forked from A's holder, which never held B."""
    mine, other = b"alpha-marker-" + os.urandom(6).hex().encode(), b"bravo-marker-9c1f07d3e5"
    server = spawn(HELD_ECHO)
    server.ready()
    context_b = _load(server, text=("b" * 4096 + other.decode()) * 4)["context_id"]
    llm.script.replace([{"when": "root", "reply": answer_with("context[-23:]")}])
    assert _ask(server, context_b)["result"]["text"] == other.decode()  # B's holder has it
    llm.script.replace(HELD_ECHO)
    context_a = _load(server, text=("a" * 4096 + mine.decode()) * 4)["context_id"]
    server.request("a", "infer", {"context_id": context_a})
    assert wait_until(lambda: llm.script.stats()["in_flight"] == 1, timeout=60)
    zygote = zygote_of(server.process.pid)
    holders = [  # the zygote's children that lead no group: not workers' keepers
        p for p in alive(descendants(zygote)) if parent_of(p) == zygote and os.getpgid(p) != p
    ]
    assert len(holders) == 2
    assert any(_memory_holds(holder, other) for holder in holders)  # B's holder
    workers = [p for holder in holders for p in alive(descendants(holder))]
    assert workers, "no worker under a holder"
    assert all(not _memory_holds(pid, other) for pid in workers)
    assert any(_memory_holds(pid, mine) for pid in workers)  # the scan does find what is there
    llm.script.released.set()
    assert server.next_response()["id"] == "a"
    assert server.close() == 0


def test_a_worker_holds_no_socket_but_its_own(spawn: Spawn, llm: FixtureServer) -> None:
    """The zygote's sockets to its holders ask for forks: a worker that kept one could have a
    worker on another context forked for it. Every worker has one socket, its own."""
    count_sockets = repl(
        "import os, socket",
        "found = []",
        "for fd in range(1024):",
        "    try:",
        "        s = socket.socket(fileno=os.dup(fd))",
        "    except OSError:",
        "        continue",
        "    found.append(s.type.name)",
        "    s.close()",
        "answer['content'] = ','.join(sorted(found))",
        "answer['ready'] = True",
    )
    server = spawn(ECHO)
    server.ready()
    context_id = _load(server, text="held by a holder")["context_id"]
    assert _ask(server, context_id)["result"]["text"] == "held by a holder"  # a holder exists
    llm.script.replace([{"when": "root", "reply": count_sockets}])
    for params in ({"prompt": "plain"}, {"context_id": context_id}):
        sockets = server.call("infer", params)["result"]["text"].split(",")
        assert "SOCK_SEQPACKET" not in sockets, (params, sockets)
    assert server.close() == 0


def test_a_worker_on_a_stored_context_that_dies_is_crashed_not_waited_for(spawn: Spawn) -> None:
    """The first question on a context starts its holder; the holder keeps none of that
    question's descriptors, so its worker's death reaches the server at once (a copy kept in
    the holder, inherited by every later worker, would have held its socket open)."""
    server = spawn(
        [
            {"when": "root", "contains": "EXITS", "reply": repl("import os", "os._exit(3)")},
            {"when": "root", "reply": answer_with("'after'")},
        ]
    )
    server.ready()
    context_id = _load(server, text="a stored context")["context_id"]
    for _ in range(2):  # the first starts the holder; the second is forked by it
        crashed = _ask(server, context_id, query="EXITS", options={"timeout_s": 60})["error"]
        assert (crashed["code"], crashed["data"]["type"]) == (-32603, "worker_crashed"), crashed
    assert _ask(server, context_id)["result"]["text"] == "after"
    assert server.close() == 0
