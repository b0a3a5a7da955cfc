/**
 * Per-request options. The wire takes snake_case only (the elizaOS plugin's camelCase was
 * silently ignored); the API offers camelCase and converts here. The names are derived from the
 * schema's InferOptions (generated), so an option added to or removed from the contract reaches
 * the API without a hand-written table to forget.
 */
import { INFER_OPTION_NAMES, type InferOptions as WireInferOptions } from "./generated/protocol.js";

/** `max_iterations` -> `maxIterations`, as a type. */
type Camel<S extends string> = S extends `${infer Head}_${infer Tail}`
  ? `${Head}${Capitalize<Camel<Tail>>}`
  : S;

/** `progress` is left out: the client sets it when `onProgress` is given. */
type OptionName = Exclude<keyof WireInferOptions, "progress">;

/** Per-request overrides in camelCase; each applies to this request only. */
export type InferOptions = {
  [K in OptionName as Camel<K>]?: WireInferOptions[K];
};

function camel(name: string): string {
  return name.replace(/_([a-z])/g, (_match, letter: string) => letter.toUpperCase());
}

const API_OPTION_NAMES = INFER_OPTION_NAMES.filter((name) => name !== "progress");

const WIRE_NAMES: ReadonlyMap<string, string> = new Map(API_OPTION_NAMES.map((wire) => [camel(wire), wire]));

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
export const OPTION_API_NAMES: readonly string[] = [...WIRE_NAMES.keys()];
