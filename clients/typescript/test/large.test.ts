/**
 * Long inputs and outputs: the product's point. Nothing on either pipe has a line-length cap,
 * so a 50 MB prompt reaches the model's REPL whole, and 200 MB go there and back whole; a 50 MB
 * stored context goes in chunks and arrives whole too. (The server bounds an answer at 64 MiB by
 * default, `--max-answer-bytes`; this server is told to allow 256 MiB.)
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import type { RLMClient } from "../src/index.js";
import { type Fixture, answerWith, openaiEnv, serverClient, startFixture } from "./helpers.js";

const MB = 1024 * 1024;

/** `size` characters of text ending in a marker, so only a whole context can answer. */
function longContext(size: number): string {
  const line = "The quick brown fox jumps over the lazy dog. ".repeat(20) + "\n";
  return line.repeat(Math.ceil(size / line.length)).slice(0, size - 16) + "END-MARKER-12345";
}

describe("long contexts", { timeout: 180_000 }, () => {
  let fixture: Fixture;
  let client: RLMClient;

  before(async () => {
    fixture = await startFixture([
      { when: "root", contains: "measure-it", reply: answerWith('f"{len(context)}:{context[-16:]}"') },
      { when: "root", contains: "echo-it", reply: answerWith("context") },
    ]);
    client = serverClient(openaiEnv(fixture.baseUrl), {
      serverArgs: ["--max-answer-bytes", String(256 * MB)],
    });
  });

  after(async () => {
    await client.close();
    await fixture.stop();
  });

  test("a 50 MB prompt reaches the REPL whole", async () => {
    const measured = await client.infer({ context: longContext(50 * MB), query: "measure-it" });
    assert.equal(measured.text, `${50 * MB}:END-MARKER-12345`);
  });

  test("a 50 MB stored context goes in 4 MiB chunks and reaches the REPL whole", async () => {
    const { contextId, bytes } = await client.loadContext(longContext(50 * MB));
    assert.equal(bytes, 50 * MB);
    const measured = await client.infer({ contextId, query: "measure-it" });
    assert.equal(measured.text, `${50 * MB}:END-MARKER-12345`);
    assert.equal(await client.dropContext(contextId), true);
  });

  test("a 200 MB prompt goes in and a 200 MB result comes back, whole", async () => {
    const context = longContext(200 * MB);
    const echoed = await client.infer({ context, query: "echo-it" });
    assert.equal(echoed.text.length, context.length);
    assert.ok(echoed.text === context, "the echoed context differs");
  });
});
