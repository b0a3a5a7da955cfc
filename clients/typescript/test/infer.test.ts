/**
 * infer against the real server and the scripted OpenAI-compatible fixture: parallelism,
 * cancellation, deadlines, a killed child, progress, options on the wire, retries, budgets,
 * metrics.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  type ProgressEvent,
  type RLMClient,
  RLMBackendError,
  RLMBudgetError,
  RLMCancelledError,
  RLMDeadlineError,
  RLMInternalError,
  RLMInvalidParamsError,
  type RLMMetrics,
  type Usage,
} from "../src/index.js";
import {
  type Fixture,
  type FixtureRule,
  answerWith,
  eventually,
  openaiEnv,
  serverClient,
  startFixture,
} from "./helpers.js";

const SLOW: FixtureRule = { when: "root", delay_ms: 20_000, reply: "too late" };
/** A root answer that does not finish the run, so that the model is called again. */
const FIRST_OF_TWO: FixtureRule = { when: "root", times: 1, reply: "```repl\nx = 1\n```" };
/** Held until the test releases it. */
const HELD: FixtureRule = { when: "root", hold: true, reply: answerWith("'finished'") };

/** A fixture with `rules` and a client for a server pointed at it; both closed after the test. */
async function setup(
  t: { after(fn: () => Promise<void>): void },
  rules: FixtureRule[],
  options: Parameters<typeof serverClient>[1] & { env?: Record<string, string> } = {},
): Promise<{ fixture: Fixture; client: RLMClient }> {
  const fixture = await startFixture(rules);
  const { env = {}, ...rest } = options;
  const client = serverClient(openaiEnv(fixture.baseUrl, env), rest);
  t.after(async () => {
    await client.close();
    await fixture.stop();
  });
  return { fixture, client };
}

/** Resolves with the first progress event of `name`, given an onProgress to pass along. */
function progressSignal(name: ProgressEvent["event"]): {
  onProgress: (event: ProgressEvent) => void;
  seen: Promise<void>;
} {
  let seen!: () => void;
  const promise = new Promise<void>((resolve) => (seen = resolve));
  return { onProgress: (event) => event.event === name && seen(), seen: promise };
}

describe("infer", { concurrency: 4 }, () => {
  test("concurrent infers run in parallel over the one child", async (t) => {
    const { fixture, client } = await setup(t, [{ when: "root", hold: true, reply: answerWith("'done'") }], {
      serverArgs: ["--max-concurrency", "4"],
    });
    const results = Promise.all(
      Array.from({ length: 4 }, (_, i) => client.infer({ context: `context ${i}` })),
    );
    // All four are at the model at once; only then are they let go.
    await eventually(
      () => fixture.stats(),
      (stats) => stats.in_flight === 4,
    );
    await fixture.release();
    const done = await results;
    assert.deepEqual(
      done.map((result) => result.text),
      ["done", "done", "done", "done"],
    );
    assert.equal((await fixture.stats()).max_in_flight, 4);
  });

  test("aborting a signal sends $/cancelRequest and rejects with -32800", async (t) => {
    const { client } = await setup(t, [SLOW]);
    const controller = new AbortController();
    const started = progressSignal("started");
    const call = client.infer({ context: "ctx", signal: controller.signal, onProgress: started.onProgress });
    await started.seen;
    controller.abort();
    await assert.rejects(call, (error: unknown) => {
      assert.ok(error instanceof RLMCancelledError);
      assert.equal(error.code, -32800);
      return true;
    });
    // The server heard the cancellation: it stopped the work and counted it.
    const status = await eventually(
      () => client.status(),
      (s) => s.metrics.cancelled_requests === 1 && s.in_flight === 0,
    );
    assert.equal(status.metrics.total_requests, 1);
    assert.equal(client.getMetrics().cancelledRequests, 1);
    assert.equal(client.getMetrics().failedRequests, 0);
  });

  test("an already aborted signal rejects without sending", async (t) => {
    const { client } = await setup(t, [SLOW]);
    await assert.rejects(client.infer({ context: "ctx", signal: AbortSignal.abort() }), RLMCancelledError);
    assert.equal((await client.status()).metrics.total_requests, 0);
  });

  test("a client timeout cancels the request on the server and rejects with -32001", async (t) => {
    const { client } = await setup(t, [SLOW]);
    await client.start(); // the timeout covers start-up too; here it is to reach the server
    await assert.rejects(client.infer({ context: "ctx", timeoutMs: 500 }), (error: unknown) => {
      assert.ok(error instanceof RLMDeadlineError);
      assert.equal(error.code, -32001);
      assert.equal(error.data?.type, "deadline_exceeded");
      return true;
    });
    await eventually(
      () => client.status(),
      (s) => s.metrics.cancelled_requests === 1 && s.in_flight === 0,
    );
    assert.equal(client.getMetrics().timedOutRequests, 1);
  });

  test("options.timeoutS reaches the server as timeout_s: its deadline gives -32001", async (t) => {
    const { client } = await setup(t, [SLOW]);
    await assert.rejects(client.infer({ context: "ctx", options: { timeoutS: 0.5 } }), (error: unknown) => {
      assert.ok(error instanceof RLMDeadlineError);
      assert.equal(error.data?.timeout_s, 0.5);
      return true;
    });
    assert.equal((await client.status()).metrics.timed_out_requests, 1);
  });

  test("a child killed mid-request rejects every pending call at once; the next call restarts it", async (t) => {
    const { client } = await setup(t, [SLOW], { maxRetries: 0 });
    const started = progressSignal("started");
    const pending = [
      client.infer({ context: "ctx", onProgress: started.onProgress }),
      client.infer({ context: "ctx" }),
    ];
    await started.seen;
    const pid = client.serverInfo?.pid;
    assert.ok(pid);
    process.kill(pid, "SIGKILL");
    for (const call of pending) {
      await assert.rejects(call, (error: unknown) => {
        assert.ok(error instanceof RLMInternalError);
        assert.equal(error.code, -32603);
        assert.equal(error.data?.type, "server_exited");
        assert.equal(error.data?.signal, "SIGKILL");
        return true;
      });
    }
    const status = await client.status();
    assert.equal(status.in_flight, 0);
    assert.notEqual(client.serverInfo?.pid, pid);
  });

  test("a call whose server exited before answering is sent again to a new server", async (t) => {
    const { fixture, client } = await setup(t, [
      { when: "root", times: 1, delay_ms: 20_000, reply: "never seen" },
      { when: "root", reply: answerWith("'second server'") },
    ]);
    const call = client.infer({ context: "ctx" });
    // The first server's model call holds the slow rule, so the second server's gets the other.
    await eventually(
      () => fixture.stats(),
      (stats) => stats.in_flight === 1,
    );
    const pid = client.serverInfo?.pid;
    assert.ok(pid);
    process.kill(pid, "SIGKILL");
    assert.equal((await call).text, "second server");
    assert.notEqual(client.serverInfo?.pid, pid);
    assert.equal(client.getMetrics().totalRetries, 1);
  });

  test("progress events reach onProgress in order, and options reach the server", async (t) => {
    const { client } = await setup(t, [
      { when: "root", times: 1, reply: "```repl\nn = len(context)\nprint(n)\n```" },
      { when: "sub", contains: "Summarise", reply: "a summary" },
      {
        when: "root",
        reply:
          '```repl\ns = llm_query("Summarise: " + context[:20])\nanswer["content"] = s\nanswer["ready"] = True\n```',
      },
    ]);
    const events: ProgressEvent[] = [];
    const result = await client.infer({
      context: "Some context to summarise.",
      query: "Summarise it",
      options: { maxIterations: 7, trajectory: true },
      onProgress: (event) => events.push(event),
    });
    assert.equal(result.text, "a summary");
    assert.ok(Array.isArray(result.trajectory));
    assert.deepEqual(
      events.map((event) => [event.event, event.iteration, event.max_iterations]),
      [
        ["started", undefined, undefined],
        ["iteration", 1, 7],
        ["subcall", undefined, undefined],
        ["iteration", 2, 7],
      ],
    );
    assert.ok(events.every((event) => event.id === events[0]?.id));
  });

  test("an unknown option key is sent as is and rejected by the server with -32602", async (t) => {
    const { client } = await setup(t, [{ when: "root", reply: answerWith("'ok'") }]);
    const options = { maxDepth: 1, bogusOption: 1 } as Record<string, unknown>;
    await assert.rejects(client.infer({ context: "ctx", options }), (error: unknown) => {
      assert.ok(error instanceof RLMInvalidParamsError);
      assert.equal(error.code, -32602);
      assert.equal(error.data?.field, "options.bogusOption");
      return true;
    });
    const ok = await client.infer({ context: "ctx", options: { maxDepth: 1, maxIterations: 2 } });
    assert.equal(ok.text, "ok");
  });

  test("temperature and maxTokens reach the model", async (t) => {
    const { fixture, client } = await setup(t, [{ when: "root", reply: answerWith("'ok'") }]);
    await client.infer({ context: "ctx", options: { temperature: 0.25, maxTokens: 77 } });
    const [body] = await fixture.requests();
    assert.equal(body?.temperature, 0.25);
    // The rlm library sends max_tokens under OpenAI's newer name.
    assert.equal(body?.max_completion_tokens ?? body?.max_tokens, 77);
  });

  test("a backend error (-32000) is never retried by the client, whatever data.retryable says", async (t) => {
    const { fixture, client } = await setup(
      t,
      [
        { when: "root", contains: "auth-fails", status: 401 },
        { when: "root", status: 500 },
      ],
      // The server's own retries are off, so every model call below is one attempt of the client's.
      { env: { ELIZA_RLM_MAX_RETRIES: "0" }, maxRetries: 2 },
    );
    await assert.rejects(client.infer({ context: "ctx", query: "auth-fails" }), (error: unknown) => {
      assert.ok(error instanceof RLMBackendError);
      assert.equal(error.data?.retryable, false);
      return true;
    });
    await assert.rejects(client.infer({ context: "ctx", query: "server-fails" }), (error: unknown) => {
      assert.ok(error instanceof RLMBackendError);
      assert.equal(error.retryable, false);
      return true;
    });
    assert.deepEqual((await fixture.stats()).statuses, { "401": 1, "500": 1 });
    const metrics = client.getMetrics();
    assert.equal(metrics.totalRetries, 0);
    assert.equal(metrics.failedRequests, 2);
    assert.equal(metrics.totalRequests, 2);
  });

  test("a budget error (-32004) names the limit, carries the usage and is not retried", async (t) => {
    // The model's first answer does not finish, so the run needs a second call: over max_calls.
    const { fixture, client } = await setup(
      t,
      [FIRST_OF_TWO, { when: "root", reply: answerWith("'late'") }],
      {
        maxRetries: 2,
      },
    );
    let spent: Usage | undefined;
    await assert.rejects(
      client.infer({ context: "ctx", options: { budget: { max_calls: 1 } } }),
      (error: unknown) => {
        assert.ok(error instanceof RLMBudgetError);
        assert.equal(error.code, -32004);
        assert.equal(error.data?.type, "budget_exceeded");
        assert.equal(error.data?.limit, "max_calls");
        assert.equal(error.data?.max, 1);
        assert.equal(error.data?.scope, "request");
        assert.equal(error.usage?.calls, 1);
        assert.ok((error.usage?.input_tokens ?? 0) > 0);
        assert.equal(error.retryable, false);
        spent = error.usage;
        return true;
      },
    );
    // One model call in all: the budget stopped the second, and the client did not send again.
    assert.equal((await fixture.stats()).requests, 1);
    const metrics = client.getMetrics();
    assert.equal(metrics.totalRetries, 0);
    assert.equal(metrics.failedRequests, 1);
    // The server's lifetime totals count that call; the scripted model has no price.
    const { metrics: server } = await client.status();
    assert.equal(server.total_calls, 1);
    assert.equal(server.total_input_tokens, spent?.input_tokens);
    assert.equal(server.total_output_tokens, spent?.output_tokens);
    assert.equal(server.total_cost_usd, null);
  });

  test("a request the server cancels carries the usage spent before", async (t) => {
    const { fixture, client } = await setup(t, [FIRST_OF_TWO, HELD]);
    const call = client.infer({ context: "ctx" });
    // The second model call is held: the first one has returned and been counted.
    await eventually(
      () => fixture.stats(),
      (stats) => stats.requests === 2,
    );
    const cancelled = assert.rejects(call, (error: unknown) => {
      assert.ok(error instanceof RLMCancelledError);
      assert.equal(error.data?.type, "cancelled");
      assert.equal(error.usage?.calls, 1);
      assert.equal(error.usage?.models["scripted"]?.calls, 1);
      return true;
    });
    // A shutdown without grace makes the server cancel the request and answer it.
    assert.deepEqual(await client.shutdown(0), { shutdown: true });
    await cancelled;
  });

  test("queue_full (-32002) is retried with backoff until admitted", async (t) => {
    const { fixture, client } = await setup(t, [{ when: "root", hold: true, reply: answerWith("'done'") }], {
      serverArgs: ["--max-concurrency", "1", "--max-queue", "1"],
      // Retries end at the deadline, not after a count that a slow machine could exhaust.
      maxRetries: Number.MAX_SAFE_INTEGER,
    });
    const calls = Array.from({ length: 3 }, () => client.infer({ context: "ctx" }));
    await eventually(
      () => Promise.resolve(client.getMetrics()),
      (m) => m.totalRetries > 0,
    );
    await fixture.release();
    const results = await Promise.all(calls);
    assert.deepEqual(
      results.map((r) => r.text),
      ["done", "done", "done"],
    );
  });

  test("an answer longer than maxLineBytes fails its own call, and the server goes on serving", async (t) => {
    const { client } = await setup(t, [{ when: "root", reply: answerWith("'x' * 10000") }], {
      maxLineBytes: 4096,
    });
    const { pid } = await client.start();
    await assert.rejects(client.infer({ context: "ctx" }), (error: unknown) => {
      assert.ok(error instanceof RLMInternalError);
      assert.equal(error.data?.type, "protocol_error");
      assert.equal(error.data?.limit, 4096);
      return true;
    });
    assert.equal((await client.status()).server, "rlm-server");
    assert.equal(client.serverInfo?.pid, pid);
  });

  test("shutdown(graceS) waits for the grace plus the request timeout, not the timeout alone", async (t) => {
    const { fixture, client } = await setup(t, [HELD], { requestTimeoutMs: 2_000 });
    const call = client.infer({ context: "ctx", timeoutMs: 60_000 });
    await eventually(
      () => fixture.stats(),
      (stats) => stats.in_flight === 1,
    );
    const cancelled = assert.rejects(call, RLMCancelledError);
    // The server answers once the 4 s grace has run out on the held call, after 2 s have passed.
    assert.deepEqual(await client.shutdown(4), { shutdown: true });
    await cancelled;
  });

  test("close() lets in-flight work finish within the grace it asks for", async (t) => {
    const { fixture, client } = await setup(t, [HELD], { shutdownGraceS: 30, closeTimeoutMs: 100 });
    const call = client.infer({ context: "ctx" });
    await eventually(
      () => fixture.stats(),
      (stats) => stats.in_flight === 1,
    );
    const closing = client.close();
    // Long past the 2 x closeTimeoutMs after which close() used to SIGTERM and SIGKILL the server.
    await new Promise((resolve) => setTimeout(resolve, 1_000));
    await fixture.release();
    assert.equal((await call).text, "finished");
    await closing;
  });

  test("metrics: successes, failures, cancellations and timeouts each counted once", async (t) => {
    const { client } = await setup(t, [
      { when: "root", contains: "slow-one", delay_ms: 20_000, reply: "late" },
      { when: "root", reply: answerWith("'fine'") },
    ]);
    const snapshots: RLMMetrics[] = [];
    const unsubscribe = client.onMetrics((metrics) => snapshots.push(metrics));
    await client.infer({ context: "ctx" });
    await client.infer({ context: "ctx" });
    await assert.rejects(client.infer({ context: "ctx", options: { maxDepth: 0 } }), RLMInvalidParamsError);
    await assert.rejects(
      client.infer({ context: "ctx", query: "slow-one", timeoutMs: 300 }),
      RLMDeadlineError,
    );
    const controller = new AbortController();
    const started = progressSignal("started");
    const cancelled = client.infer({
      context: "ctx",
      query: "slow-one",
      signal: controller.signal,
      onProgress: started.onProgress,
    });
    await started.seen;
    controller.abort();
    await assert.rejects(cancelled, RLMCancelledError);
    unsubscribe();
    await client.infer({ context: "ctx" });

    const metrics = client.getMetrics();
    assert.equal(metrics.totalRequests, 6);
    assert.equal(metrics.successfulRequests, 3);
    assert.equal(metrics.failedRequests, 1);
    assert.equal(metrics.timedOutRequests, 1);
    assert.equal(metrics.cancelledRequests, 1);
    assert.equal(metrics.stubResponses, 0);
    assert.equal(metrics.totalRetries, 0);
    assert.match(metrics.lastError ?? "", /\d+ ms/, "the timeout was the last error");
    assert.ok(metrics.averageLatencyMs > 0);
    assert.ok(metrics.p50LatencyMs > 0 && metrics.p50LatencyMs <= metrics.p95LatencyMs);
    assert.ok(metrics.p95LatencyMs <= metrics.p99LatencyMs);
    assert.deepEqual(
      snapshots.map((s) => s.totalRequests),
      [1, 2, 3, 4, 5],
      "no callback after unsubscribe",
    );
  });
});
