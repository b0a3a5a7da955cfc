/**
 * Host tools against the real server and the scripted fixture: model code calls handlers of
 * this process through `tool/call`, concurrently; errors, timeouts and cancellation.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { RLMBudgetError, RLMCancelledError, type RLMClient, type ToolDefinition } from "../src/index.js";
import { ToolRunner } from "../src/tools.js";
import { type FixtureRule, memoryLogger, openaiEnv, serverClient, startFixture } from "./helpers.js";

const KEY_SCHEMA = {
  type: "object",
  properties: { key: { type: "string" } },
  required: ["key"],
  additionalProperties: false,
};

function repl(...lines: string[]): string {
  return "```repl\n" + lines.join("\n") + "\n```";
}

async function setup(t: { after(fn: () => Promise<void>): void }, rules: FixtureRule[]): Promise<RLMClient> {
  const fixture = await startFixture(rules);
  const client = serverClient(openaiEnv(fixture.baseUrl));
  t.after(async () => {
    await client.close();
    await fixture.stop();
  });
  return client;
}

/** A promise and the function that resolves it. */
function signal<T = void>(): { promise: Promise<T>; resolve(value: T): void } {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((done) => (resolve = done));
  return { promise, resolve };
}

describe("host tools", { concurrency: 4 }, () => {
  test("model code calls two tools at once and uses their values", async (t) => {
    const code = repl(
      "from concurrent.futures import ThreadPoolExecutor",
      "with ThreadPoolExecutor(2) as pool:",
      "    a = pool.submit(lookup, key='alpha')",
      "    b = pool.submit(search, q='beta')",
      "    record, hits = a.result(), b.result()",
      "answer['content'] = record['owner'] + ' ' + hits[0]",
      "answer['ready'] = True",
    );
    const client = await setup(t, [{ when: "root", reply: code }]);
    // Each handler waits until both are running: the two calls must be in flight together.
    const both = [signal(), signal()];
    const together = Promise.all(both.map((s) => s.promise));
    const lookup: ToolDefinition = {
      description: "Look a record up by key.",
      inputSchema: KEY_SCHEMA,
      handler: async (args) => {
        both[0]!.resolve();
        await together;
        return { owner: `ada-${String(args.key)}` };
      },
    };
    const search: ToolDefinition = {
      description: "Search memory.",
      inputSchema: { type: "object", properties: { q: { type: "string" } } },
      handler: async (args, call) => {
        assert.equal(call.name, "search");
        both[1]!.resolve();
        await together;
        return [`hit-${String(args.q)}`];
      },
    };
    const result = await client.infer({ context: "ctx", tools: { lookup, search } });
    assert.equal(result.text, "ada-alpha hit-beta");
  });

  test("a handler that throws: model code gets ToolError with its message", async (t) => {
    const code = repl(
      "try:",
      "    lookup(key='missing')",
      "except ToolError as error:",
      "    answer['content'] = 'caught: ' + str(error)",
      "answer['ready'] = True",
    );
    const client = await setup(t, [{ when: "root", reply: code }]);
    const handler = (): never => {
      throw new Error("no record for missing");
    };
    const result = await client.infer({
      context: "ctx",
      tools: { lookup: { description: "Look up.", inputSchema: KEY_SCHEMA, handler } },
    });
    assert.equal(result.text, "caught: no record for missing");
  });

  test("a hanging handler hits toolTimeoutS and its signal aborts", async (t) => {
    const code = repl(
      "try:",
      "    lookup(key='slow')",
      "except ToolError as error:",
      "    answer['content'] = str(error)",
      "answer['ready'] = True",
    );
    const client = await setup(t, [{ when: "root", reply: code }]);
    const aborted = signal();
    const handler = (_args: unknown, call: { signal: AbortSignal }): Promise<never> =>
      new Promise(() => call.signal.addEventListener("abort", () => aborted.resolve()));
    const result = await client.infer({
      context: "ctx",
      options: { toolTimeoutS: 0.3 },
      tools: { lookup: { description: "Look up.", inputSchema: KEY_SCHEMA, handler } },
    });
    assert.equal(result.text, "lookup timed out after 0.3 s (tool_timeout_s)");
    await aborted.promise;
  });

  test("cancelling the infer aborts its pending tool call", async (t) => {
    const client = await setup(t, [{ when: "root", reply: repl("answer['content'] = lookup(key='x')") }]);
    const started = signal();
    const aborted = signal();
    const handler = (_args: unknown, call: { signal: AbortSignal }): Promise<never> => {
      started.resolve();
      return new Promise(() => call.signal.addEventListener("abort", () => aborted.resolve()));
    };
    const controller = new AbortController();
    const running = client.infer({
      context: "ctx",
      signal: controller.signal,
      tools: { lookup: { description: "Look up.", inputSchema: KEY_SCHEMA, handler } },
    });
    await started.promise;
    controller.abort();
    await assert.rejects(running, RLMCancelledError);
    await aborted.promise;
  });

  test("invalid arguments are refused before the handler is called", async (t) => {
    const code = repl(
      "try:",
      "    lookup(key=5)",
      "except ToolError as error:",
      "    answer['content'] = str(error)",
      "answer['ready'] = True",
    );
    const client = await setup(t, [{ when: "root", reply: code }]);
    let called = 0;
    const handler = (): string => String((called += 1));
    const result = await client.infer({
      context: "ctx",
      tools: { lookup: { description: "Look up.", inputSchema: KEY_SCHEMA, handler } },
    });
    assert.match(result.text, /^the arguments of lookup do not match its input schema: key:/);
    assert.equal(called, 0);
  });

  test("maxToolCalls ends the request with RLMBudgetError", async (t) => {
    const code = repl("for key in 'abc':", "    lookup(key=key)", "answer['ready'] = True");
    const client = await setup(t, [{ when: "root", reply: code }]);
    const infer = client.infer({
      context: "ctx",
      options: { budget: { max_tool_calls: 1 } },
      tools: { lookup: { description: "Look up.", inputSchema: KEY_SCHEMA, handler: () => "ok" } },
    });
    await assert.rejects(infer, (error: unknown) => {
      assert.ok(error instanceof RLMBudgetError);
      assert.equal(error.data?.limit, "max_tool_calls");
      return true;
    });
  });

  test("a session's tools serve its turns", async (t) => {
    const client = await setup(t, [
      { when: "root", reply: repl("answer['content'] = lookup(key='t')", "answer['ready'] = True") },
    ]);
    const session = await client.openSession({
      tools: {
        lookup: {
          description: "Look up.",
          inputSchema: KEY_SCHEMA,
          handler: (args) => `v-${String(args.key)}`,
        },
      },
    });
    assert.equal((await session.infer("first")).text, "v-t");
    assert.equal((await session.infer("second")).text, "v-t");
    await session.close();
  });

  test("infer('text'), the pre-0.4 form, is a TypeError that says how to call it", async (t) => {
    const client = await setup(t, []);
    const call = client.infer as unknown as (text: string) => Promise<unknown>;
    await assert.rejects(call.call(client, "some text"), (error: unknown) => {
      assert.ok(error instanceof TypeError);
      assert.match(error.message, /infer\(\{ context, query \}\)/);
      return true;
    });
  });
});

describe("ToolRunner", () => {
  /** A runner whose answers are kept, and a promise of the next one. */
  function runner(): { tools: ToolRunner; next(): Promise<Record<string, unknown>> } {
    const waiting: Array<(message: Record<string, unknown>) => void> = [];
    const tools = new ToolRunner((message) => {
      JSON.stringify(message); // what the connection does first: a value JSON cannot hold throws
      waiting.shift()?.(message);
    }, memoryLogger());
    return { tools, next: () => new Promise((resolve) => waiting.push(resolve)) };
  }
  const params = (name: string) => ({ request_id: 1, name, arguments: {} });

  test("a tool with no handler here is answered with an error at once", async () => {
    const { tools, next } = runner();
    const answered = next();
    tools.call("tool-1", params("missing"), {});
    assert.deepEqual(await answered, {
      jsonrpc: "2.0",
      id: "tool-1",
      error: { code: -32000, message: 'no handler for tool "missing" in this client' },
    });
  });

  test("a value JSON cannot hold is answered with an error; undefined is null", async () => {
    const { tools, next } = runner();
    const handler = (): unknown => 10n;
    let answered = next();
    tools.call("tool-1", params("big"), { big: { description: "", inputSchema: {}, handler } });
    assert.equal(
      ((await answered).error as { message: string }).message,
      "the tool's value cannot be sent as JSON",
    );
    answered = next();
    tools.call("tool-2", params("none"), {
      none: { description: "", inputSchema: {}, handler: () => undefined },
    });
    assert.equal((await answered).result, null);
  });
});
