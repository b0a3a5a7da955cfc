/** The elizaOS-style plugin: the seven model types, and prompt, messages and options passed through. */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { RLMInvalidParamsError, RLM_MODEL_TYPES, createRlmPlugin, rlmPlugin } from "../src/index.js";
import { STUB_ENV, answerWith, openaiEnv, serverClient, startFixture } from "./helpers.js";

const runtime = {};

describe("rlmPlugin", { concurrency: true }, () => {
  test("registers a handler for each of the seven text model types, by elizaOS ModelType value", () => {
    assert.equal(rlmPlugin.name, "rlm");
    assert.deepEqual(Object.keys(rlmPlugin.models).sort(), [
      "REASONING_LARGE",
      "REASONING_SMALL",
      "TEXT_COMPLETION",
      "TEXT_LARGE",
      "TEXT_RLM_LARGE",
      "TEXT_RLM_REASONING",
      "TEXT_SMALL",
    ]);
    assert.deepEqual(Object.keys(RLM_MODEL_TYPES), [
      "TEXT_SMALL",
      "TEXT_LARGE",
      "TEXT_REASONING_SMALL",
      "TEXT_REASONING_LARGE",
      "TEXT_COMPLETION",
      "TEXT_RLM_LARGE",
      "TEXT_RLM_REASONING",
    ]);
    assert.equal(typeof rlmPlugin.client.infer, "function");
  });

  test("every handler answers through the server (stub mode) and is counted as a stub", async (t) => {
    const plugin = createRlmPlugin(serverClient(STUB_ENV));
    t.after(() => plugin.client.close());
    const texts = await Promise.all(
      Object.values(plugin.models).map((handler) => handler(runtime, { prompt: "hello" })),
    );
    assert.deepEqual(texts, Array(7).fill("[RLM STUB] RLM backend not available"));
    assert.equal(plugin.client.getMetrics().stubResponses, 7);
  });

  test("messages, query and options are passed through; generic text params are not options", async (t) => {
    const fixture = await startFixture([
      { when: "root", contains: "which-code", reply: answerWith('context[0]["content"].split()[-1]') },
    ]);
    const plugin = createRlmPlugin(serverClient(openaiEnv(fixture.baseUrl)));
    t.after(async () => {
      await plugin.client.close();
      await fixture.stop();
    });
    const text = await plugin.models.TEXT_RLM_LARGE(runtime, {
      messages: [{ role: "user", content: "the code is ZEBRA-42" }],
      prompt: "ignored when messages are given",
      query: "which-code",
      temperature: 0.3,
      maxTokens: 50,
      maxIterations: 3,
      topP: 0.9,
      stopSequences: ["\n"],
      options: { maxDepth: 1 },
    });
    assert.equal(text, "ZEBRA-42");
    const [body] = await fixture.requests();
    assert.equal(body?.temperature, 0.3);
    assert.equal(body?.max_completion_tokens ?? body?.max_tokens, 50);
  });

  test("an unknown key inside options reaches the server, which names it", async (t) => {
    const plugin = createRlmPlugin(serverClient(STUB_ENV));
    t.after(() => plugin.client.close());
    await assert.rejects(
      plugin.models.TEXT_LARGE(runtime, { prompt: "p", options: { bogus: true } }),
      (error: unknown) => error instanceof RLMInvalidParamsError && error.data?.field === "options.bogus",
    );
  });

  test("a call with neither prompt nor messages is refused before any process starts", async () => {
    const plugin = createRlmPlugin(serverClient(STUB_ENV));
    await assert.rejects(plugin.models.TEXT_SMALL(runtime, {}), TypeError);
    assert.equal(typeof plugin.client.serverInfo, "undefined");
  });
});
