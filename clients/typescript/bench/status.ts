/**
 * Client-side overhead per `status` call and throughput of 1,000 concurrent `status` calls.
 *
 * Overhead: the same request over a raw pipe to one server process (write a line, wait for the
 * answer line) against the same through RLMClient to another process of the same server and
 * configuration, in alternating blocks so that drift hits both alike. Throughput: 1,000
 * status calls issued at once through the client, timed until the last answer, several rounds.
 *
 *   npm run bench            (RLM_BENCH_N=10000 RLM_BENCH_ROUNDS=20 to change the sizes)
 */
import { spawn } from "node:child_process";
import { RLMClient } from "../src/index.js";
import { percentile } from "../src/metrics.js";
import { PYTHON, SERVER_ARGS, STUB_ENV, applyEnv, serverEnv, stopChild } from "../test/helpers.js";

const N = Number(process.env.RLM_BENCH_N ?? 10_000);
const BLOCKS = 5;
const ROUNDS = Number(process.env.RLM_BENCH_ROUNDS ?? 20);
const CONCURRENT = 1_000;
const WARMUP = 500;

/** A bare pipe to a server: one line out, one line back, nothing else. */
async function rawServer(): Promise<{
  call(): Promise<void>;
  callMany(n: number): Promise<void>;
  stop(): Promise<void>;
}> {
  const child = spawn(PYTHON, SERVER_ARGS, {
    env: applyEnv(serverEnv(STUB_ENV)),
    stdio: ["pipe", "pipe", "inherit"],
  });
  let buffered = "";
  let waiting: { left: number; done: () => void } | undefined;
  let ready!: () => void;
  const readySeen = new Promise<void>((resolve) => (ready = resolve));
  let sawReady = false;
  child.stdout.setEncoding("utf8");
  child.stdout.on("data", (chunk: string) => {
    buffered += chunk;
    let newline = buffered.indexOf("\n");
    while (newline !== -1) {
      buffered = buffered.slice(newline + 1);
      if (!sawReady) {
        sawReady = true;
        ready();
      } else if (waiting && --waiting.left === 0) {
        const { done } = waiting;
        waiting = undefined;
        done();
      }
      newline = buffered.indexOf("\n");
    }
  });
  await readySeen;
  let id = 0;
  const callMany = (n: number): Promise<void> =>
    new Promise<void>((done) => {
      waiting = { left: n, done };
      let lines = "";
      for (let i = 0; i < n; i += 1) lines += `{"jsonrpc":"2.0","id":${++id},"method":"status"}\n`;
      child.stdin.write(lines);
    });
  return { call: () => callMany(1), callMany, stop: () => stopChild(child) };
}

async function timeEach(n: number, call: () => Promise<unknown>): Promise<number[]> {
  const samples: number[] = [];
  for (let i = 0; i < n; i += 1) {
    const start = performance.now();
    await call();
    samples.push(performance.now() - start);
  }
  return samples;
}

function summary(samples: number[]): { p50: number; p99: number; mean: number } {
  const sorted = [...samples].sort((a, b) => a - b);
  const mean = sorted.reduce((sum, v) => sum + v, 0) / sorted.length;
  return { p50: percentile(sorted, 50), p99: percentile(sorted, 99), mean };
}

const us = (ms: number): string => `${(ms * 1000).toFixed(1)} µs`;

async function main(): Promise<void> {
  const raw = await rawServer();
  const client = new RLMClient({ command: PYTHON, args: SERVER_ARGS, env: serverEnv(STUB_ENV) });
  await client.status();
  await timeEach(WARMUP, () => raw.call());
  await timeEach(WARMUP, () => client.status());

  const rawSamples: number[] = [];
  const clientSamples: number[] = [];
  for (let block = 0; block < BLOCKS; block += 1) {
    rawSamples.push(...(await timeEach(N / BLOCKS, () => raw.call())));
    clientSamples.push(...(await timeEach(N / BLOCKS, () => client.status())));
  }
  const rawStats = summary(rawSamples);
  const clientStats = summary(clientSamples);

  const rounds: number[] = [];
  const rawRounds: number[] = [];
  for (let round = 0; round < ROUNDS + 2; round += 1) {
    let start = performance.now();
    await Promise.all(Array.from({ length: CONCURRENT }, () => client.status()));
    const clientMs = performance.now() - start;
    start = performance.now();
    await raw.callMany(CONCURRENT);
    const rawMs = performance.now() - start;
    if (round >= 2) {
      rounds.push(clientMs);
      rawRounds.push(rawMs);
    }
  }
  const batch = summary(rounds);
  const rawBatch = summary(rawRounds);

  console.log(
    `sequential status, ${N} calls each (node ${process.version}, ${PYTHON} -m rlm_server, stub mode)`,
  );
  console.log(`  raw pipe     p50 ${us(rawStats.p50)}  p99 ${us(rawStats.p99)}  mean ${us(rawStats.mean)}`);
  console.log(
    `  RLMClient    p50 ${us(clientStats.p50)}  p99 ${us(clientStats.p99)}  mean ${us(clientStats.mean)}`,
  );
  console.log(
    `  client overhead per call: p50 ${us(clientStats.p50 - rawStats.p50)}, mean ${us(clientStats.mean - rawStats.mean)}`,
  );
  console.log(`${CONCURRENT} concurrent status calls, ${ROUNDS} rounds (median of rounds)`);
  console.log(
    `  RLMClient    ${batch.p50.toFixed(1)} ms per 1,000 -> ${Math.round((CONCURRENT / batch.p50) * 1000)} calls/s (best round ${Math.round((CONCURRENT / Math.min(...rounds)) * 1000)} calls/s)`,
  );
  console.log(
    `  raw pipe     ${rawBatch.p50.toFixed(1)} ms per 1,000 -> ${Math.round((CONCURRENT / rawBatch.p50) * 1000)} calls/s (one write of 1,000 lines)`,
  );

  await client.close();
  await raw.stop();
}

await main();
