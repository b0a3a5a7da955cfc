/**
 * The elizaOS plugin against the real server: settings through the runtime, the service that
 * owns the child, prompt -> query and context -> REPL, and stream / stopSequences /
 * responseFormat honoured or refused.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import type { IAgentRuntime, Plugin, TextStreamResult } from "@elizaos/core";
import { RLMUnavailableError } from "../src/errors.js";
import {
  DEFAULT_PRIORITY,
  RLMUnsupportedError,
  RLM_MODEL_TYPES,
  RlmService,
  createRlmPlugin,
  rlmPlugin,
} from "../src/plugin.js";
import {
  PYTHON,
  STUB_ENV,
  answerWith,
  gone,
  openaiEnv,
  serverClient,
  serverEnv,
  startFixture,
} from "./helpers.js";

/** The part of IAgentRuntime the plugin uses: settings, and the services it started. */
function fakeRuntime(settings: Record<string, string>): IAgentRuntime {
  const services = new Map<string, RlmService>();
  const runtime = {
    getSetting: (key: string) => settings[key] ?? null,
    getService: (type: string) => services.get(type) ?? null,
    getServiceLoadPromise: async (type: string) => services.get(type),
    async startServices() {
      services.set(RlmService.serviceType, await RlmService.start(runtime as unknown as IAgentRuntime));
    },
  };
  return runtime as unknown as IAgentRuntime;
}

async function started(
  settings: Record<string, string>,
): Promise<{ runtime: IAgentRuntime; service: RlmService }> {
  const runtime = fakeRuntime(settings);
  await (runtime as unknown as { startServices(): Promise<void> }).startServices();
  const service = runtime.getService<RlmService>(RlmService.serviceType);
  assert.ok(service);
  return { runtime, service };
}

/** Settings that point the server at the fixture, as a character's settings would. */
function fixtureSettings(baseUrl: string): Record<string, string> {
  const env = serverEnv(openaiEnv(baseUrl, { ELIZA_RLM_PYTHON_PATH: PYTHON }));
  return Object.fromEntries(Object.entries(env).filter((e): e is [string, string] => e[1] !== undefined));
}

const runtime = fakeRuntime({});

describe("rlmPlugin", { concurrency: true }, () => {
  test("follows elizaOS's plugin shape: config, low priority, a service, the text models", () => {
    const plugin: Plugin = rlmPlugin; // type-checks against @elizaos/core
    assert.equal(plugin.name, "rlm");
    assert.equal(plugin.priority, DEFAULT_PRIORITY);
    assert.ok(DEFAULT_PRIORITY < 0, "the agent's usual model keeps TEXT_SMALL/TEXT_LARGE");
    assert.equal(plugin.config?.ELIZA_RLM_BACKEND, null);
    assert.deepEqual(plugin.services, [RlmService]);
    assert.deepEqual(Object.keys(rlmPlugin.models).sort(), Object.values(RLM_MODEL_TYPES).sort());
  });

  test("init reads the priority through the runtime: the user can ask for the text models", async () => {
    const plugin = createRlmPlugin();
    await plugin.init?.({}, fakeRuntime({ ELIZA_RLM_PRIORITY: "50" }));
    assert.equal(plugin.priority, 50);
    const fromConfig = createRlmPlugin();
    await fromConfig.init?.({ ELIZA_RLM_PRIORITY: "7" }, fakeRuntime({}));
    assert.equal(fromConfig.priority, 7);
    await assert.rejects(
      createRlmPlugin().init?.({}, fakeRuntime({ ELIZA_RLM_PRIORITY: "high" })) ?? Promise.resolve(),
      TypeError,
    );
  });

  test("the prompt is the query, the context goes to the REPL; the service's stop() ends the child", async (t) => {
    const fixture = await startFixture([
      {
        when: "root",
        contains: "What is the vault code?",
        reply: answerWith('__import__("re").search(r"vault code is (\\w+)", context).group(1)'),
      },
    ]);
    t.after(() => fixture.stop());
    const { runtime: agent, service } = await started(fixtureSettings(fixture.baseUrl));
    const context = `${"filler. ".repeat(20_000)}The vault code is K2Q. ${"more. ".repeat(100)}`;
    const text = await rlmPlugin.models.TEXT_RLM_LARGE(agent, { prompt: "What is the vault code?", context });
    assert.equal(text, "K2Q");
    const bodies = JSON.stringify(await fixture.requests());
    assert.ok(bodies.includes("What is the vault code?"), "the root model saw the query");
    assert.ok(!bodies.includes("K2Q"), "and not the context");
    const pid = service.client.serverInfo?.pid;
    assert.ok(pid);
    await RlmService.stop(agent);
    await gone(pid);
  });

  test("stream: true yields the answer as one chunk; stop sequences cut it", async (t) => {
    const fixture = await startFixture([{ when: "root", reply: answerWith('"alpha STOP beta"') }]);
    const client = serverClient(openaiEnv(fixture.baseUrl));
    t.after(async () => {
      await client.close();
      await fixture.stop();
    });
    const plugin = createRlmPlugin(client);
    const streamed = (await plugin.models.TEXT_LARGE(runtime, {
      prompt: "go",
      stream: true,
    })) as TextStreamResult;
    const chunks: string[] = [];
    for await (const chunk of streamed.textStream) chunks.push(chunk);
    assert.deepEqual(chunks, ["alpha STOP beta"]);
    assert.equal(await streamed.text, "alpha STOP beta");
    assert.equal(
      await plugin.models.TEXT_SMALL(runtime, { prompt: "go", stopSequences: ["STOP", "beta"] }),
      "alpha ",
    );
  });

  test("tools passed in the model params are host tools of the request", async (t) => {
    const fixture = await startFixture([{ when: "root", reply: answerWith('recall(topic="launch")') }]);
    const client = serverClient(openaiEnv(fixture.baseUrl));
    t.after(async () => {
      await client.close();
      await fixture.stop();
    });
    const plugin = createRlmPlugin(client);
    const asked: unknown[] = [];
    const text = await plugin.models.TEXT_LARGE(runtime, {
      prompt: "What did we decide about the launch?",
      tools: {
        recall: {
          description: "The agent's memory of a topic.",
          inputSchema: { type: "object", properties: { topic: { type: "string" } }, required: ["topic"] },
          handler: (args: Record<string, unknown>) => {
            asked.push(args.topic);
            return "launch moved to Tuesday";
          },
        },
      },
    } as Parameters<typeof plugin.models.TEXT_LARGE>[1]);
    assert.equal(text, "launch moved to Tuesday");
    assert.deepEqual(asked, ["launch"]);
  });

  test("an object model passes the tools in its params on as host tools", async (t) => {
    const fixture = await startFixture([
      { when: "root", reply: answerWith('{"when": recall(topic="launch")}') },
    ]);
    const client = serverClient(openaiEnv(fixture.baseUrl));
    t.after(async () => {
      await client.close();
      await fixture.stop();
    });
    const plugin = createRlmPlugin(client);
    const object = await plugin.models.OBJECT_LARGE(runtime, {
      prompt: "When is the launch?",
      tools: {
        recall: {
          description: "The agent's memory of a topic.",
          inputSchema: { type: "object", properties: { topic: { type: "string" } }, required: ["topic"] },
          handler: () => "Tuesday",
        },
      },
    } as Parameters<typeof plugin.models.OBJECT_LARGE>[1]);
    assert.deepEqual(object, { when: "Tuesday" });
  });

  test("OBJECT_LARGE returns an object valid against the schema inside the runtime", async (t) => {
    const fixture = await startFixture([
      {
        when: "root",
        contains: "Your answer was refused",
        reply: answerWith('{"code": "K2Q", "digits": 1}'),
      },
      { when: "root", reply: answerWith('{"code": "K2Q", "digits": "one"}') },
    ]);
    t.after(() => fixture.stop());
    const { runtime: agent } = await started(fixtureSettings(fixture.baseUrl));
    t.after(() => RlmService.stop(agent));
    const schema = {
      type: "object",
      properties: { code: { type: "string" }, digits: { type: "integer" } },
      required: ["code", "digits"],
    };
    const object = await rlmPlugin.models.OBJECT_LARGE(agent, {
      prompt: "Which vault code, and how many digits?",
      schema,
      context: "The vault code is K2Q.",
    });
    assert.deepEqual(object, { code: "K2Q", digits: 1 });
    const bodies = JSON.stringify(await fixture.requests());
    assert.ok(bodies.includes('\\"digits\\":{\\"type\\":\\"integer\\"}'), "the root model saw the schema");
    const anyObject = await rlmPlugin.models.OBJECT_SMALL(agent, { prompt: "Anything" });
    assert.deepEqual(anyObject, { code: "K2Q", digits: "one" }, "any object will do");
  });

  test("responseFormat json_object returns JSON text; other formats are refused before any process starts", async (t) => {
    const fixture = await startFixture([{ when: "root", reply: answerWith('{"ok": True}') }]);
    const client = serverClient(openaiEnv(fixture.baseUrl));
    t.after(async () => {
      await client.close();
      await fixture.stop();
    });
    const plugin = createRlmPlugin(client);
    for (const responseFormat of [{ type: "json_object" } as const, "json_object"]) {
      assert.equal(await plugin.models.TEXT_LARGE(runtime, { prompt: "p", responseFormat }), '{"ok":true}');
    }
    const stub = serverClient(STUB_ENV);
    const refused = createRlmPlugin(stub);
    await assert.rejects(
      refused.models.TEXT_LARGE(runtime, { prompt: "p", responseFormat: "xml" }),
      (error: unknown) => error instanceof RLMUnsupportedError && /responseFormat "xml"/.test(error.message),
    );
    await assert.rejects(
      refused.models.TEXT_LARGE(runtime, {
        prompt: "p",
        responseFormat: "json_object",
        stopSequences: ["}"],
      }),
      RLMUnsupportedError,
    );
    await assert.rejects(
      refused.models.OBJECT_LARGE(runtime, { prompt: "p", output: "array" }),
      RLMUnsupportedError,
    );
    assert.equal(stub.serverInfo, undefined);
    assert.equal(
      await refused.models.TEXT_LARGE(runtime, { prompt: "p", responseFormat: { type: "text" } }),
      "[RLM STUB] RLM backend not available",
    );
    await assert.rejects(refused.models.OBJECT_SMALL(runtime, { prompt: "p" }), RLMUnavailableError);
    await stub.close();
  });

  test("a call without a prompt is refused before any process starts", async () => {
    const client = serverClient(STUB_ENV);
    await assert.rejects(createRlmPlugin(client).models.TEXT_SMALL(runtime, { prompt: "" }), TypeError);
    assert.equal(client.serverInfo, undefined);
  });
});
