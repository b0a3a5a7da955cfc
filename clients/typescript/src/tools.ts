/**
 * Host tools: functions of this process that model code in the server's REPL calls by name.
 *
 * An infer (or a session) declares them; the server sends a `tool/call` request (an id of its
 * own, `tool-N`) for each call model code makes, after checking its arguments against the tool's
 * `inputSchema`. The handler runs here, concurrently with any other, and its value (any JSON) is
 * the answer; a handler that throws answers with an error whose message model code gets as
 * `ToolError`. The server's `$/cancelRequest` for a call (its infer was cancelled or timed out,
 * or the call passed `toolTimeoutS`) aborts the handler's signal; its answer is then not sent.
 */
import type { Logger } from "./connection.js";
import type { ToolDeclaration } from "./generated/protocol.js";

/** What a handler knows about the call it serves. */
export interface ToolCall {
  /** The tool's name. */
  name: string;
  /** The id of the infer whose model code made the call. */
  requestId: number;
  /** Aborts when the server no longer waits for the answer. */
  signal: AbortSignal;
}

/** A host tool's handler: its keyword arguments (valid against `inputSchema`), and the call. */
export type ToolHandler = (args: Record<string, unknown>, call: ToolCall) => unknown;

export interface ToolDefinition {
  /** What the tool does, for the root model's prompt. */
  description: string;
  /** A JSON Schema object for the keyword arguments; the server checks every call against it. */
  inputSchema: Record<string, unknown>;
  handler: ToolHandler;
}

/** Tools by name: each name a Python identifier, which becomes a function in the REPL. */
export type Tools = Readonly<Record<string, ToolDefinition>>;

/** The wire's `tools`: name, description and input_schema of each. */
export function toWireTools(tools: Tools): ToolDeclaration[] {
  return Object.entries(tools).map(([name, tool]) => ({
    name,
    description: tool.description,
    input_schema: tool.inputSchema,
  }));
}

type Json = Record<string, unknown>;

/** The code of a tool's error answer: the handler failed (model code sees only the message). */
export const TOOL_ERROR_CODE = -32000;

function isObject(value: unknown): value is Json {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** Runs the handlers of one connection's tool calls, and aborts them when the server says so. */
export class ToolRunner {
  private readonly running = new Map<string, AbortController>();

  constructor(
    /** Writes one message (an answer) to the server. */
    private readonly send: (message: Json) => void,
    private readonly logger: Logger,
  ) {}

  /** A `tool/call` request: run its handler (from `tools`, its infer's) and answer it. */
  call(id: string, params: unknown, tools: Tools | undefined): void {
    const name = isObject(params) && typeof params.name === "string" ? params.name : "";
    const tool = tools !== undefined && Object.hasOwn(tools, name) ? tools[name] : undefined;
    if (!isObject(params) || !isObject(params.arguments) || tool === undefined) {
      this.answerError(id, `no handler for tool ${JSON.stringify(name)} in this client`);
      return;
    }
    const controller = new AbortController();
    this.running.set(id, controller);
    const call: ToolCall = { name, requestId: Number(params.request_id), signal: controller.signal };
    const args = params.arguments;
    void (async () => {
      try {
        const value: unknown = await tool.handler(args, call);
        if (!controller.signal.aborted) this.answer(id, value);
      } catch (error) {
        if (!controller.signal.aborted)
          this.answerError(id, error instanceof Error ? error.message : String(error));
      } finally {
        this.running.delete(id);
      }
    })();
  }

  /** The server's `$/cancelRequest` for a tool call: abort its handler. */
  cancel(id: unknown): void {
    if (typeof id === "string") this.running.get(id)?.abort();
  }

  /** The connection is gone: abort every handler still running. */
  abortAll(): void {
    for (const controller of this.running.values()) controller.abort();
  }

  private answer(id: string, value: unknown): void {
    try {
      this.send({ jsonrpc: "2.0", id, result: value === undefined ? null : value });
    } catch (error) {
      // A value JSON cannot hold (a BigInt, a cycle): model code gets the reason instead.
      this.logger.warn(`tool call ${id}: the handler's value is not JSON: ${String(error)}`);
      this.answerError(id, "the tool's value cannot be sent as JSON");
    }
  }

  private answerError(id: string, message: string): void {
    this.send({ jsonrpc: "2.0", id, error: { code: TOOL_ERROR_CODE, message } });
  }
}
