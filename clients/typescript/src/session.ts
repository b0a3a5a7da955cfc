/**
 * A session: one REPL on the server that lives across `infer` turns, so a turn can use the
 * variables an earlier one set. It lives in the server process that opened it: its turns and its
 * close go to that process only, and end with it.
 */
import type { ChatMessage, InferCallOptions, StructuredResult, WithAnswerSchema } from "./client.js";
import type { InferResult } from "./generated/protocol.js";

/** One turn's options: the infer options, and optionally a new input. */
export interface TurnOptions extends InferCallOptions {
  /**
   * New input for this turn: it becomes the REPL's next `context_N` (`context_0`, which is also
   * `context`, in a session that has no context yet). Without it the turn adds nothing.
   */
  context?: string | readonly ChatMessage[];
}

/** What a turn sends besides its query and options. */
export interface TurnInput {
  session_id: string;
  prompt?: string | readonly ChatMessage[];
}

/** How a session reaches the server process it lives in (made by the client that opens it). */
export interface SessionLink {
  turn(input: TurnInput, query: string, options: TurnOptions): Promise<InferResult>;
  close(sessionId: string): Promise<boolean>;
}

export class Session implements AsyncDisposable {
  private closing: Promise<boolean> | undefined;

  /** Made by `RLMClient.openSession`. */
  constructor(
    /** The server's id for it (`ses-` and 32 hex digits). */
    readonly id: string,
    private readonly link: SessionLink,
  ) {}

  /**
   * One turn: `query` to the root model, in the session's REPL, where what earlier turns set is
   * still there. Turns of one session run one at a time, in the order sent. A turn that ends
   * before its worker finished it (cancelled, past its deadline, a crashed worker) closes the
   * session: later turns reject with RLMInvalidParamsError (`data.field` `session_id`).
   */
  infer<T = unknown>(query: string, options: WithAnswerSchema<TurnOptions>): Promise<StructuredResult<T>>;
  infer(query: string, options?: TurnOptions): Promise<InferResult>;
  infer<T>(query: string, options: TurnOptions = {}): Promise<InferResult | StructuredResult<T>> {
    const { context } = options;
    return this.link.turn(
      { session_id: this.id, ...(context === undefined ? {} : { prompt: context }) },
      query,
      options,
    );
  }

  /**
   * Closes the session and frees its worker. Resolves with whether the server still had it
   * open (false once it expired, or when its server is gone). Idempotent: later calls share the
   * first one's answer; only a close that failed is tried again.
   */
  close(): Promise<boolean> {
    this.closing ??= this.link.close(this.id).catch((error: unknown) => {
      this.closing = undefined;
      throw error;
    });
    return this.closing;
  }

  /** `await using session = await client.openSession()` closes it at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
