/**
 * Structured answers (`options.answerSchema`) against the real server and the scripted fixture:
 * the value comes back decoded into the caller's type; an answer that never matches rejects with
 * RLMInvalidAnswerError.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { type AnswerSchema, RLMInvalidAnswerError, type RLMClient } from "../src/index.js";
import { answerWith, openaiEnv, serverClient, startFixture } from "./helpers.js";

interface Found {
  code: string;
  line: number;
}

const SCHEMA: AnswerSchema = {
  type: "object",
  properties: { code: { type: "string" }, line: { type: "integer" } },
  required: ["code", "line"],
};

async function clientFor(t: { after(fn: () => Promise<void>): void }, reply: string): Promise<RLMClient> {
  const fixture = await startFixture([{ when: "root", reply }]);
  const client = serverClient(openaiEnv(fixture.baseUrl));
  t.after(async () => {
    await client.close();
    await fixture.stop();
  });
  return client;
}

test("infer<T> with answerSchema returns the answer as a T", async (t) => {
  const client = await clientFor(t, answerWith('{"code": "ZEBRA-42", "line": 21}'));
  const result = await client.infer<Found>({
    context: "…",
    query: "Where is the code?",
    options: { answerSchema: SCHEMA },
  });
  assert.equal(result.stub, false);
  if (result.stub) return;
  const found: Found = result.value; // typed: no cast
  assert.deepEqual(found, { code: "ZEBRA-42", line: 21 });
  assert.equal(found.line + 1, 22);
  assert.equal(result.text, '{"code":"ZEBRA-42","line":21}');

  await using session = await client.openSession();
  const turn = await session.infer<Found>("Where is the code?", { options: { answerSchema: SCHEMA } });
  assert.deepEqual(turn.value, { code: "ZEBRA-42", line: 21 });
  const plain = await session.infer("Again, as text");
  assert.equal(plain.value, undefined);
});

test("an answer that never matches rejects with RLMInvalidAnswerError, its reason and usage", async (t) => {
  const client = await clientFor(t, answerWith('{"code": "ZEBRA-42", "line": "21"}'));
  await assert.rejects(
    client.infer<Found>({ context: "…", options: { answerSchema: SCHEMA, answerRepairs: 1 } }),
    (error: unknown) =>
      error instanceof RLMInvalidAnswerError &&
      error.code === -32006 &&
      error.data?.type === "invalid_answer" &&
      error.data.validation_error === "at $.line: '21' is not of type 'integer'" &&
      error.data.usage?.calls === 2,
  );
});
