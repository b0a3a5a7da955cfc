/**
 * Per-request options. The wire takes snake_case only (the elizaOS plugin's camelCase was
 * silently ignored); the API offers camelCase and converts here. The name table is checked
 * against the schema's InferOptions, so an option added to or removed from the contract fails
 * the build until this file follows.
 */
import type { InferOptions as WireInferOptions } from "./generated/protocol.js";

/** Wire name -> API name. `progress` is absent: the client sets it when `onProgress` is given. */
const API_NAMES = {
  backend: "backend",
  model: "model",
  sub_model: "subModel",
  base_url: "baseUrl",
  max_iterations: "maxIterations",
  max_depth: "maxDepth",
  timeout_s: "timeoutS",
  temperature: "temperature",
  max_tokens: "maxTokens",
  trajectory: "trajectory",
} as const satisfies { readonly [K in Exclude<keyof WireInferOptions, "progress">]-?: string };

type OptionName = keyof typeof API_NAMES;

/** Per-request overrides in camelCase; each applies to this request only. */
export type InferOptions = {
  [K in OptionName as (typeof API_NAMES)[K]]?: WireInferOptions[K];
};

const WIRE_NAMES: ReadonlyMap<string, string> = new Map(
  Object.entries(API_NAMES).map(([wire, api]) => [api, wire]),
);

/**
 * Converts to wire names. Keys that are not API names (a snake_case name, or a typo) pass
 * through unchanged, so the server accepts the former and rejects the latter with -32602
 * naming it, instead of the client dropping an option silently.
 */
export function toWireOptions(options: Readonly<Record<string, unknown>>): Record<string, unknown> {
  const wire: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(options)) {
    if (value !== undefined) wire[WIRE_NAMES.get(key) ?? key] = value;
  }
  return wire;
}

/** The API names, for callers (such as the plugin) that pick options out of a wider object. */
export const OPTION_API_NAMES: readonly string[] = Object.values(API_NAMES);
