/**
 * Sessions against the real server and the scripted fixture: a REPL that lives across turns (turn
 * 2 reads a variable turn 1 set), on a stored context or on a turn's own input; an idempotent
 * close; typed errors for unknown ids; a session whose server died.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  RLMClient,
  RLMDeadlineError,
  RLMInternalError,
  RLMInvalidParamsError,
  type Session,
} from "../src/index.js";
import {
  type Fixture,
  READY_LINE,
  answerWith,
  eventually,
  memoryLogger,
  openaiEnv,
  serverClient,
  startFixture,
} from "./helpers.js";

const SECRET_TEXT =
  "Filler line.\n".repeat(20) + "The secret code is ZEBRA-42.\n" + "More filler.\n".repeat(20);

const RULES = [
  // Turn 2: its root prompt says earlier turns' history is in the REPL; `code` is still there.
  {
    when: "root" as const,
    contains: "prior conversation history",
    reply: answerWith('"the code was " + code'),
  },
  // Turn 1: finds the code and keeps it in a variable.
  {
    when: "root" as const,
    reply:
      '```repl\nimport re\ncode = re.search(r"secret code is ([A-Z]+-[0-9]+)", context).group(1)\n' +
      'answer["content"] = "noted"\nanswer["ready"] = True\n```',
  },
];

function isInvalid(field: string): (error: unknown) => boolean {
  return (error) => {
    assert.ok(error instanceof RLMInvalidParamsError, String(error));
    assert.equal(error.data?.field, field);
    return true;
  };
}

/** Two turns: the first keeps the code in a REPL variable, the second reads it. */
async function twoTurns(session: Session, firstTurnContext?: string): Promise<void> {
  const first = await session.infer(
    "Find the secret code and remember it.",
    firstTurnContext === undefined ? {} : { context: firstTurnContext },
  );
  assert.equal(first.text, "noted");
  assert.equal((await session.infer("What was the code?")).text, "the code was ZEBRA-42");
}

describe("sessions", { timeout: 120_000 }, () => {
  let fixture: Fixture;
  let client: RLMClient;

  before(async () => {
    fixture = await startFixture(RULES);
    client = serverClient(openaiEnv(fixture.baseUrl));
  });

  after(async () => {
    await client.close();
    await fixture.stop();
  });

  test("on a stored context: turn 2 reads what turn 1 set; the session holds the context until closed", async () => {
    const { contextId } = await client.loadContext(SECRET_TEXT);
    const session = await client.openSession({ contextId });
    assert.match(session.id, /^ses-[0-9a-f]{32}$/);
    const before = client.getMetrics().successfulRequests;
    await twoTurns(session);
    assert.equal(client.getMetrics().successfulRequests, before + 2); // turns are infers
    const uses = async (): Promise<number | undefined> =>
      (await client.listContexts()).contexts.find((entry) => entry.contextId === contextId)?.uses;
    assert.equal(await uses(), 1);
    assert.equal((await client.status()).sessions.count, 1);

    assert.equal(await session.close(), true);
    assert.equal(await session.close(), true); // idempotent: the first close's answer
    assert.equal((await client.status()).sessions.count, 0);
    assert.equal(await uses(), 0);
    await assert.rejects(session.infer("Still there?"), isInvalid("session_id"));
  });

  test("without a stored context: a turn's own context becomes the REPL's context", async () => {
    await using session = await client.openSession();
    await twoTurns(session, SECRET_TEXT);
  });

  test("unknown ids are refused with typed errors naming the field", async () => {
    await assert.rejects(client.openSession({ contextId: "ctx-unknown" }), isInvalid("context_id"));
    await assert.rejects(client.infer({ contextId: "ctx-unknown" }), isInvalid("context_id"));
    assert.equal(await client.dropContext("ctx-unknown"), false);
  });

  test("await using closes the session at the end of its scope", async () => {
    let id: string;
    {
      await using session = await client.openSession();
      id = session.id;
      assert.equal((await client.status()).sessions.count, 1);
    }
    assert.match(id, /^ses-/);
    assert.equal((await client.status()).sessions.count, 0);
  });
});

describe("a session whose server died", () => {
  test("its turns reject with server_exited, not sent to a new server; close() resolves false", async (t) => {
    const fixture = await startFixture(RULES);
    const client = serverClient(openaiEnv(fixture.baseUrl));
    t.after(async () => {
      await client.close();
      await fixture.stop();
    });
    const session = await client.openSession();
    const { pid } = await client.start();
    process.kill(pid, "SIGKILL");
    await eventually(
      () => Promise.resolve(client.serverInfo),
      (info) => info === undefined,
    );
    await assert.rejects(session.infer("anyone?", { context: SECRET_TEXT }), (error: unknown) => {
      assert.ok(error instanceof RLMInternalError);
      assert.equal(error.data?.type, "server_exited");
      return true;
    });
    assert.equal(await session.close(), false);
    assert.equal(client.serverInfo, undefined); // neither started a new server
    assert.notEqual((await client.start()).pid, pid); // the next ordinary call does
  });
});

/** A fake server that answers session/open only after 300 ms, and says on stderr what it closed. */
const SLOW_OPEN_SERVER = `
const send = (message) => process.stdout.write(JSON.stringify(message) + "\\n");
process.stdout.write(${JSON.stringify(READY_LINE)} + "\\n");
require("node:readline").createInterface({ input: process.stdin }).on("line", (line) => {
  const { id, method, params } = JSON.parse(line);
  if (method === "session/open") {
    setTimeout(() => send({ jsonrpc: "2.0", id, result: { session_id: "ses-late" } }), 300);
  } else if (method === "session/close") {
    console.error("closed " + params.session_id);
    send({ jsonrpc: "2.0", id, result: { closed: true } });
  } else if (method === "shutdown") {
    send({ jsonrpc: "2.0", id, result: { shutdown: true } });
    process.exit(0);
  }
});
`;

test("a session opened after its caller gave up is closed, not left open", async (t) => {
  const logger = memoryLogger();
  const client = new RLMClient({ command: process.execPath, args: ["-e", SLOW_OPEN_SERVER], logger });
  t.after(() => client.close());
  await client.start();
  await assert.rejects(client.openSession({ timeoutMs: 50 }), RLMDeadlineError);
  await eventually(
    () => Promise.resolve(logger.lines),
    (lines) => lines.some((line) => line.includes("closed ses-late")),
  );
});
