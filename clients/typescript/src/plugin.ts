/**
 * An elizaOS plugin that routes the runtime's text models to rlm-server. The shapes below are
 * structural copies of the few @elizaos/core types it touches, so the package has no runtime
 * dependency on elizaOS and any runtime that calls `models[type](runtime, params)` can use it.
 */
import { type ChatMessage, RLMClient, type RLMClientOptions } from "./client.js";
import { type InferOptions, OPTION_API_NAMES } from "./options.js";

/** elizaOS ModelType values this plugin answers (keys are the ModelType constant names). */
export const RLM_MODEL_TYPES = {
  TEXT_SMALL: "TEXT_SMALL",
  TEXT_LARGE: "TEXT_LARGE",
  TEXT_REASONING_SMALL: "REASONING_SMALL",
  TEXT_REASONING_LARGE: "REASONING_LARGE",
  TEXT_COMPLETION: "TEXT_COMPLETION",
  TEXT_RLM_LARGE: "TEXT_RLM_LARGE",
  TEXT_RLM_REASONING: "TEXT_RLM_REASONING",
} as const;

/** The part of elizaOS's IAgentRuntime that a model handler may receive; unused here. */
export type AgentRuntimeLike = object;

/** elizaOS GenerateTextParams, plus the RLM's own fields. */
export interface GenerateTextParamsLike {
  prompt?: string;
  messages?: ChatMessage[];
  /** The short question for the root model; the prompt or messages are its context. */
  query?: string;
  /** RLM options, camelCase or snake_case, passed through as they are (unknown keys get -32602). */
  options?: InferOptions & Record<string, unknown>;
  [key: string]: unknown;
}

export type ModelHandler = (runtime: AgentRuntimeLike, params: GenerateTextParamsLike) => Promise<string>;

export interface RLMPlugin {
  name: string;
  description: string;
  models: Record<(typeof RLM_MODEL_TYPES)[keyof typeof RLM_MODEL_TYPES], ModelHandler>;
  /** The client behind the handlers: for status, metrics and close(). */
  client: RLMClient;
}

/**
 * Names the seed plugin accepted at the top level of the params, mapped to this client's
 * option names; generic text params the RLM has no use for (topP, stopSequences, stream...) are
 * not options and are left out.
 */
const SEED_ALIASES: Readonly<Record<string, keyof InferOptions>> = {
  rootModel: "model",
  subcallModel: "subModel",
  logTrajectories: "trajectory",
};

/** Top-level RLM options (temperature, maxTokens, maxIterations...) under `options`' own keys. */
function collectOptions(params: GenerateTextParamsLike): Record<string, unknown> {
  const picked: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(params)) {
    const name = OPTION_API_NAMES.includes(key) ? key : SEED_ALIASES[key];
    if (name !== undefined && value !== undefined) picked[name] = value;
  }
  return { ...picked, ...params.options };
}

function handler(client: RLMClient): ModelHandler {
  return async (_runtime, params) => {
    const context = params.messages?.length ? params.messages : params.prompt;
    if (context === undefined) throw new TypeError("rlm: params.prompt or params.messages is required");
    const result = await client.infer({
      context,
      ...(typeof params.query === "string" ? { query: params.query } : {}),
      options: collectOptions(params) as InferOptions,
    });
    return result.text;
  };
}

/** A plugin bound to `client`, or to a new client built from `options`. */
export function createRlmPlugin(clientOrOptions: RLMClient | RLMClientOptions = {}): RLMPlugin {
  const client = clientOrOptions instanceof RLMClient ? clientOrOptions : new RLMClient(clientOrOptions);
  const handle = handler(client);
  const models = Object.fromEntries(
    Object.values(RLM_MODEL_TYPES).map((type) => [type, handle]),
  ) as RLMPlugin["models"];
  return {
    name: "rlm",
    description: "Recursive Language Models through rlm-server: long contexts explored in a REPL",
    models,
    client,
  };
}

/** The default plugin: one lazily started rlm-server, configured from the environment. */
export const rlmPlugin: RLMPlugin = createRlmPlugin();
