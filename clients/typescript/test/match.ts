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

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** Where `value` first fails `pattern`, as a path and a reason; undefined when it matches. */
export function mismatch(pattern: unknown, value: unknown, path = "$"): string | undefined {
  if (typeof pattern === "string" && pattern.startsWith("$") && pattern in TYPE_MATCHERS) {
    return TYPE_MATCHERS[pattern]?.(value)
      ? undefined
      : `${path}: ${JSON.stringify(value)} is not ${pattern}`;
  }
  if (Array.isArray(pattern)) {
    if (!Array.isArray(value) || value.length !== pattern.length) {
      return `${path}: expected an array of ${pattern.length}, got ${JSON.stringify(value)}`;
    }
    for (let i = 0; i < pattern.length; i += 1) {
      const found = mismatch(pattern[i], value[i], `${path}[${i}]`);
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
        const found = mismatch(expected, value[key], `${path}.${key}`);
        if (found) return found;
      }
    }
    return undefined;
  }
  return pattern === value
    ? undefined
    : `${path}: expected ${JSON.stringify(pattern)}, got ${JSON.stringify(value)}`;
}

/** Whether the values can be paired one to one with the patterns (any order). */
export function matchesAsSet(patterns: readonly unknown[], values: readonly unknown[]): boolean {
  if (patterns.length !== values.length) return false;
  const used = new Array<boolean>(values.length).fill(false);
  const assign = (i: number): boolean => {
    if (i === patterns.length) return true;
    for (let j = 0; j < values.length; j += 1) {
      if (!used[j] && mismatch(patterns[i], values[j]) === undefined) {
        used[j] = true;
        if (assign(i + 1)) return true;
        used[j] = false;
      }
    }
    return false;
  };
  return assign(0);
}
