/**
 * The elizaOS plugin (`rlm-server-client/plugin`): the runtime's text models answered by
 * rlm-server, following elizaOS's conventions.
 *
 * - Settings are read through the runtime (`runtime.getSetting`, which sees character settings,
 *   secrets and the environment) when the plugin is initialised, never from `process.env` at
 *   import time; `config` lists every setting it reads.
 * - The server is a service (`RlmService`, type `rlm`): started by the runtime, and `stop()`
 *   closes the child process.
 * - `priority` is below every other provider's (-10), so registering the plugin adds the
 *   `TEXT_RLM_*` models without taking `TEXT_SMALL`/`TEXT_LARGE` from the agent's usual model;
 *   `ELIZA_RLM_PRIORITY` raises it when the user wants the RLM to answer those too.
 * - A call's `prompt` is what the agent asks: the root model's `query`. The long material the
 *   RLM explores goes in `context` (a string or messages; or `messages`), which becomes the
 *   REPL's `context`; without it, the prompt is the context too.
 * - `stream`, `stopSequences` and `responseFormat` are honoured or refused, never ignored:
 *   a stream yields the answer as one chunk once the REPL has set it (an RLM answer does not
 *   exist before that), stop sequences cut the answer at the first one, a `text` format is
 *   what the RLM returns anyway, and a `json_object` format asks the server for an answer that
 *   is a JSON object (`options.answer_schema`), returned as its JSON text (stop sequences are
 *   refused then: a cut would break the JSON).
 * - `OBJECT_SMALL` and `OBJECT_LARGE` return the answer as an object, valid against `schema`
 *   when given, else any JSON object, checked by the server before it returns it (`output`
 *   other than `object` is refused: give a schema instead; so are stop sequences).
 *
 * `@elizaos/core` is an optional peer dependency: only this entry point imports it.
 */
import {
  type GenerateTextParams,
  type IAgentRuntime,
  ModelType,
  type ObjectGenerationParams,
  type Plugin,
  Service,
  type TextStreamResult,
} from "@elizaos/core";
import { type AnswerSchema, type ChatMessage, RLMClient, type RLMClientOptions } from "./client.js";
import { RLMError, RLMUnavailableError } from "./errors.js";
import type { InferOptions } from "./options.js";
import type { Tools } from "./tools.js";

/** Settings the plugin reads through the runtime and passes to the server's environment. */
export const RLM_SETTINGS = [
  "ELIZA_RLM_PYTHON_PATH",
  "ELIZA_RLM_BACKEND",
  "ELIZA_RLM_MODEL",
  "ELIZA_RLM_SUB_MODEL",
  "ELIZA_RLM_BASE_URL",
  "ELIZA_RLM_ENV",
  "ELIZA_RLM_MAX_ITERATIONS",
  "ELIZA_RLM_MAX_DEPTH",
  "ELIZA_RLM_TIMEOUT",
  "ELIZA_RLM_MAX_CONCURRENCY",
  "ELIZA_RLM_STRICT",
  "ELIZA_RLM_VERBOSE",
  "OPENAI_API_KEY",
  "ANTHROPIC_API_KEY",
  "GEMINI_API_KEY",
  "GOOGLE_API_KEY",
  "GROQ_API_KEY",
  "OPENROUTER_API_KEY",
  "AI_GATEWAY_API_KEY",
  "PORTKEY_API_KEY",
  "AZURE_OPENAI_API_KEY",
] as const;

/** The plugin's own setting: its priority among the agent's model providers. */
export const PRIORITY_SETTING = "ELIZA_RLM_PRIORITY";
/** Below the default (0) of every other provider: the RLM answers only what nobody else does. */
export const DEFAULT_PRIORITY = -10;

/** The model types the plugin registers: elizaOS's text and object models, and two RLM-only ones. */
export const RLM_MODEL_TYPES = {
  TEXT_SMALL: ModelType.TEXT_SMALL,
  TEXT_LARGE: ModelType.TEXT_LARGE,
  TEXT_REASONING_SMALL: ModelType.TEXT_REASONING_SMALL,
  TEXT_REASONING_LARGE: ModelType.TEXT_REASONING_LARGE,
  TEXT_COMPLETION: ModelType.TEXT_COMPLETION,
  TEXT_RLM_LARGE: "TEXT_RLM_LARGE",
  TEXT_RLM_REASONING: "TEXT_RLM_REASONING",
  OBJECT_SMALL: ModelType.OBJECT_SMALL,
  OBJECT_LARGE: ModelType.OBJECT_LARGE,
} as const;

/** The object models among them; the others return text. */
const OBJECT_MODEL_TYPES: ReadonlySet<string> = new Set([ModelType.OBJECT_SMALL, ModelType.OBJECT_LARGE]);

/** The answer of a JSON `responseFormat`, and of an object model given no schema. */
const ANY_OBJECT: AnswerSchema = { type: "object" };

/** elizaOS's text params, plus the RLM's own: the long `context` and per-request `options`. */
export interface RlmTextParams extends GenerateTextParams {
  /** What the RLM explores in its REPL (string or messages); default: the prompt. */
  context?: string | ChatMessage[];
  /** Same as `context` given as messages (the seed plugin's name). */
  messages?: ChatMessage[];
  /** RLM options for this request (camelCase), e.g. `{ maxIterations: 8 }`. */
  options?: InferOptions;
  /** Host tools the model's REPL code may call, run in this process (see `InferRequest.tools`). */
  tools?: Tools;
}

/** elizaOS's object params, plus the RLM's own, as for text. */
export interface RlmObjectParams extends ObjectGenerationParams {
  context?: string | ChatMessage[];
  messages?: ChatMessage[];
  options?: InferOptions;
  tools?: Tools;
}

/** A call the plugin will not answer, with the reason: raised before anything is spent. */
export class RLMUnsupportedError extends RLMError {
  constructor(message: string) {
    super(-32602, `rlm: ${message}`, { type: "invalid_params" });
    this.name = "RLMUnsupportedError";
  }
}

/** Reads the plugin's settings through the runtime; the plugin's `config` fills the gaps. */
export function readSettings(
  runtime: IAgentRuntime,
  config: Record<string, string> = {},
): Record<string, string> {
  const settings: Record<string, string> = {};
  for (const key of [...RLM_SETTINGS, PRIORITY_SETTING]) {
    const value = runtime.getSetting(key) ?? config[key];
    if (value !== null && value !== undefined && value !== "") settings[key] = String(value);
  }
  return settings;
}

/** Client options that start the server with these settings in its environment. */
export function clientOptions(settings: Record<string, string>): RLMClientOptions {
  const env: Record<string, string> = {};
  for (const key of RLM_SETTINGS) {
    if (settings[key] !== undefined) env[key] = settings[key];
  }
  return { env };
}

/** The running server, as an elizaOS service: started by the runtime, closed by `stop()`. */
export class RlmService extends Service {
  static override serviceType = "rlm";
  override capabilityDescription =
    "Recursive Language Models through rlm-server (long contexts explored in a REPL)";
  readonly client: RLMClient;

  constructor(runtime?: IAgentRuntime, client?: RLMClient) {
    super(runtime);
    this.client = client ?? new RLMClient(runtime ? clientOptions(readSettings(runtime)) : {});
  }

  static override async start(runtime: IAgentRuntime): Promise<RlmService> {
    return new RlmService(runtime);
  }

  static override async stop(runtime: IAgentRuntime): Promise<void> {
    await runtime.getService<RlmService>(RlmService.serviceType)?.stop();
  }

  override async stop(): Promise<void> {
    await this.client.close();
  }
}

/** The service's client; waits for the service while the runtime is still starting it. */
async function clientOf(runtime: IAgentRuntime): Promise<RLMClient> {
  const running = runtime.getService<RlmService>(RlmService.serviceType);
  if (running) return running.client;
  const loading = runtime.getServiceLoadPromise(
    RlmService.serviceType as Parameters<IAgentRuntime["getServiceLoadPromise"]>[0],
  );
  return ((await loading) as RlmService).client;
}

/**
 * The schema a text call's `responseFormat` asks for: none for text, any object for JSON. Refuses
 * what the RLM cannot honour, before any process starts or any token is spent.
 */
function textFormat(params: RlmTextParams): AnswerSchema | undefined {
  const format = params.responseFormat;
  const type = typeof format === "string" ? format : format?.type;
  requirePrompt(params);
  if (type === undefined || type === "text") return undefined;
  if (type !== "json_object") {
    throw new RLMUnsupportedError(
      `responseFormat ${JSON.stringify(type)} is not supported: use "text" or "json_object"`,
    );
  }
  refuseStops(params.stopSequences, "responseFormat json_object");
  return ANY_OBJECT;
}

/** The schema an object call asks for: `schema`, else any JSON object. */
function objectSchema(params: RlmObjectParams): AnswerSchema {
  requirePrompt(params);
  refuseStops(params.stopSequences, "an object model");
  if (params.output !== undefined && params.output !== "object") {
    throw new RLMUnsupportedError(
      `output ${JSON.stringify(params.output)} is not supported: give a schema for anything but an object`,
    );
  }
  return (params.schema as AnswerSchema | undefined) ?? ANY_OBJECT;
}

function requirePrompt(params: { prompt?: unknown }): void {
  if (typeof params.prompt !== "string" || params.prompt === "") {
    throw new TypeError("rlm: params.prompt (what the agent asks) is required");
  }
}

function refuseStops(stopSequences: readonly string[] | undefined, what: string): void {
  if (stopSequences?.length) {
    throw new RLMUnsupportedError(`stopSequences are not supported with ${what}: a cut would break the JSON`);
  }
}

/** `prompt` -> query; `context` or `messages` (else the prompt) -> the REPL's context. */
function inferRequest(
  params: (RlmTextParams | RlmObjectParams) & { maxTokens?: number },
  answerSchema: AnswerSchema | undefined,
): {
  context: string | ChatMessage[];
  query: string;
  options: InferOptions;
  tools?: Tools;
} {
  const context = params.context ?? (params.messages?.length ? params.messages : params.prompt);
  const options: InferOptions = { ...params.options };
  if (params.temperature !== undefined && options.temperature === undefined)
    options.temperature = params.temperature;
  if (params.maxTokens !== undefined && options.maxTokens === undefined) options.maxTokens = params.maxTokens;
  if (answerSchema !== undefined) options.answerSchema = answerSchema;
  return { context, query: params.prompt, options, ...(params.tools ? { tools: params.tools } : {}) };
}

/** The answer up to the first stop sequence, as a model stopping there would have written it. */
export function cutAtStop(text: string, stopSequences: readonly string[] | undefined): string {
  let end = text.length;
  for (const stop of stopSequences ?? []) {
    const at = stop === "" ? -1 : text.indexOf(stop);
    if (at !== -1 && at < end) end = at;
  }
  return text.slice(0, end);
}

/** One chunk, the whole answer, once the REPL has set it: what an RLM can stream. */
function oneChunkStream(text: Promise<string>): TextStreamResult {
  return {
    textStream: (async function* () {
      yield await text;
    })(),
    text,
    usage: text.then(() => undefined),
    finishReason: text.then(() => "stop"),
  };
}

export type RlmModelHandler = (
  runtime: IAgentRuntime,
  params: RlmTextParams,
) => Promise<string | TextStreamResult>;

export type RlmObjectHandler = (
  runtime: IAgentRuntime,
  params: RlmObjectParams,
) => Promise<Record<string, unknown>>;

function textHandler(fixed: RLMClient | undefined): RlmModelHandler {
  return async (runtime, params) => {
    const answerSchema = textFormat(params);
    const client = fixed ?? (await clientOf(runtime));
    const answer = client
      .infer(inferRequest(params, answerSchema))
      .then((result) => cutAtStop(result.text, params.stopSequences));
    return params.stream === true ? oneChunkStream(answer) : answer;
  };
}

function objectHandler(fixed: RLMClient | undefined): RlmObjectHandler {
  return async (runtime, params) => {
    const client = fixed ?? (await clientOf(runtime));
    const { options, ...request } = inferRequest(params, undefined);
    const answerSchema = objectSchema(params);
    const result = await client.infer<Record<string, unknown>>({
      ...request,
      options: { ...options, answerSchema },
    });
    if (result.stub) {
      throw new RLMUnavailableError(
        -32003,
        "rlm: the server has no backend (stub mode): no object to return",
        {
          type: "backend_unavailable",
        },
      );
    }
    return result.value;
  };
}

type TextModelType = Exclude<
  (typeof RLM_MODEL_TYPES)[keyof typeof RLM_MODEL_TYPES],
  typeof ModelType.OBJECT_SMALL | typeof ModelType.OBJECT_LARGE
>;

export type RlmPlugin = Plugin & {
  models: Record<TextModelType, RlmModelHandler> &
    Record<typeof ModelType.OBJECT_SMALL | typeof ModelType.OBJECT_LARGE, RlmObjectHandler>;
  priority: number;
};

/**
 * The plugin. With no argument the runtime's `rlm` service runs the server; a client given here
 * answers instead (for an application that manages its own client).
 */
export function createRlmPlugin(client?: RLMClient): RlmPlugin {
  const text = textHandler(client);
  const object = objectHandler(client);
  const plugin: RlmPlugin = {
    name: "rlm",
    description: "Recursive Language Models through rlm-server: long contexts explored in a REPL",
    config: Object.fromEntries([...RLM_SETTINGS, PRIORITY_SETTING].map((key) => [key, null])),
    priority: DEFAULT_PRIORITY,
    services: client ? [] : [RlmService],
    models: Object.fromEntries(
      Object.values(RLM_MODEL_TYPES).map((type) => [type, OBJECT_MODEL_TYPES.has(type) ? object : text]),
    ) as unknown as RlmPlugin["models"],
    async init(config, runtime) {
      const raw = readSettings(runtime, config)[PRIORITY_SETTING];
      if (raw === undefined) return;
      const priority = Number(raw);
      if (!Number.isFinite(priority))
        throw new TypeError(`rlm: ${PRIORITY_SETTING} must be a number, got ${raw}`);
      plugin.priority = priority; // read by the runtime when it registers the models, after init
    },
  };
  return plugin;
}

/** The default plugin: register it with the runtime (`plugins: [rlmPlugin]`). */
export const rlmPlugin: RlmPlugin = createRlmPlugin();
