/** The transcript pattern matcher defined in protocol/README.md. */

const TYPE_MATCHERS: Readonly<Record<string, (value: unknown) => boolean>> = {
  $any: () => true,
  $string: (value) => typeof value === "string",
  $number: (value) => typeof value === "number",
  $integer: (value) => Number.isInteger(value),
  $boolean: (value) => typeof value === "boolean",
  $object: (value) => isObject(value),
  $array: (value) => Array.isArray(value),
  $null: (value) => value === null,
};

/** `$bind:NAME` matches any string and remembers it; `$ref:NAME` stands for what was remembered. */
const BIND = "$bind:";
const REF = "$ref:";

/** The strings `$bind:NAME` patterns matched, by NAME, for later `$ref:NAME`s. */
export type Bound = Record<string, string>;

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/**
 * Where `value` first fails `pattern`, as a path and a reason; undefined when it matches. The
 * strings it binds are added to `bound` only when the whole of it matches.
 */
export function mismatch(pattern: unknown, value: unknown, bound: Bound = {}): string | undefined {
  const trial = { ...bound };
  const found = firstMismatch(pattern, value, trial, "$");
  if (found === undefined) Object.assign(bound, trial);
  return found;
}

function firstMismatch(pattern: unknown, value: unknown, bound: Bound, path: string): string | undefined {
  if (typeof pattern === "string" && pattern.startsWith("$")) {
    const found = stringMatcher(pattern, value, bound, path);
    if (found !== "literal") return found;
  }
  if (Array.isArray(pattern)) {
    if (!Array.isArray(value) || value.length !== pattern.length) {
      return `${path}: expected an array of ${pattern.length}, got ${JSON.stringify(value)}`;
    }
    for (let i = 0; i < pattern.length; i += 1) {
      const found = firstMismatch(pattern[i], value[i], bound, `${path}[${i}]`);
      if (found) return found;
    }
    return undefined;
  }
  if (isObject(pattern)) {
    if (!isObject(value)) return `${path}: expected an object, got ${JSON.stringify(value)}`;
    for (const [key, expected] of Object.entries(pattern)) {
      if (expected === "$absent") {
        if (key in value) return `${path}.${key}: should be absent, is ${JSON.stringify(value[key])}`;
      } else if (!(key in value)) {
        return `${path}.${key}: missing`;
      } else {
        const found = firstMismatch(expected, value[key], bound, `${path}.${key}`);
        if (found) return found;
      }
    }
    return undefined;
  }
  return pattern === value
    ? undefined
    : `${path}: expected ${JSON.stringify(pattern)}, got ${JSON.stringify(value)}`;
}

/** A type matcher, `$bind:` or `$ref:`: its verdict; "literal" for any other string. */
function stringMatcher(pattern: string, value: unknown, bound: Bound, path: string): string | undefined {
  const matcher = TYPE_MATCHERS[pattern];
  if (matcher) return matcher(value) ? undefined : `${path}: ${JSON.stringify(value)} is not ${pattern}`;
  if (pattern.startsWith(BIND)) {
    if (typeof value !== "string") return `${path}: ${JSON.stringify(value)} is not a string to bind`;
    bound[pattern.slice(BIND.length)] = value;
    return undefined;
  }
  if (pattern.startsWith(REF)) {
    const name = pattern.slice(REF.length);
    if (!(name in bound)) return `${path}: ${pattern} names nothing bound yet`;
    return value === bound[name]
      ? undefined
      : `${path}: expected ${pattern} (${bound[name]}), got ${JSON.stringify(value)}`;
  }
  return "literal";
}

/** `value` with every `$ref:NAME` string replaced by the string bound to NAME (for `send`). */
export function substitute(value: unknown, bound: Bound): unknown {
  if (typeof value === "string" && value.startsWith(REF)) {
    const name = value.slice(REF.length);
    if (!(name in bound)) throw new Error(`${value} names nothing bound yet`);
    return bound[name];
  }
  if (Array.isArray(value)) return value.map((item) => substitute(item, bound));
  if (isObject(value)) {
    return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, substitute(item, bound)]));
  }
  return value;
}

/**
 * Whether the values can be paired one to one with the patterns (any order); the strings the
 * pairing binds are added to `bound` only when one is found.
 */
export function matchesAsSet(
  patterns: readonly unknown[],
  values: readonly unknown[],
  bound: Bound = {},
): boolean {
  if (patterns.length !== values.length) return false;
  const used = new Array<boolean>(values.length).fill(false);
  const assign = (i: number, trial: Bound): Bound | undefined => {
    if (i === patterns.length) return trial;
    for (let j = 0; j < values.length; j += 1) {
      const next = { ...trial };
      if (!used[j] && mismatch(patterns[i], values[j], next) === undefined) {
        used[j] = true;
        const found = assign(i + 1, next);
        if (found) return found;
        used[j] = false;
      }
    }
    return undefined;
  };
  const found = assign(0, { ...bound });
  if (found) Object.assign(bound, found);
  return found !== undefined;
}
