// Generates src/generated/protocol.ts from protocol/schema.json, or with --check fails when the
// committed file differs, so that a schema change the client has not followed breaks `npm test`.
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { compile } from "json-schema-to-typescript";

const here = dirname(fileURLToPath(import.meta.url));
const schemaPath = resolve(here, "../../../protocol/schema.json");
const outPath = resolve(here, "../src/generated/protocol.ts");

const BANNER = `// GENERATED from protocol/schema.json by scripts/gen-types.mjs. Do not edit by hand:
// run \`npm run gen:types\`. \`npm test\` fails when this file and the schema disagree.
`;

/**
 * The values the client needs at run time, not only as types: read from the schema so that no
 * hand-written copy can drift from it.
 */
function constants(defs) {
  const list = (values) => `[${values.map((value) => JSON.stringify(value)).join(", ")}] as const`;
  return `
/** The protocol version this client speaks: the \`ready\` notification's \`protocol\`. */
export const PROTOCOL_VERSION = ${JSON.stringify(defs.ReadyNotification.properties.params.properties.protocol.const)} as const;
/** Every error code of the contract. */
export const ERROR_CODES = ${list(defs.ErrorCode.enum)};
/** Every \`data.type\` of the contract. */
export const ERROR_TYPES = ${list(defs.ErrorType.enum)};
/** Every per-request option, by its wire name. */
export const INFER_OPTION_NAMES = ${list(Object.keys(defs.InferOptions.properties))};
`;
}

/**
 * A `$ref` with siblings (say a `description`) makes the generator emit a copy of the referenced
 * type under a new name (`Usage1`); as the single member of an `allOf` it stays the named type and
 * the description becomes the property's doc comment. Returns a rewritten copy of `node`.
 */
function refsWithSiblings(node) {
  if (Array.isArray(node)) return node.map(refsWithSiblings);
  if (node === null || typeof node !== "object") return node;
  const out = Object.fromEntries(Object.entries(node).map(([key, value]) => [key, refsWithSiblings(value)]));
  if (typeof out.$ref !== "string" || Object.keys(out).length === 1) return out;
  const { $ref, ...siblings } = out;
  return { allOf: [{ $ref }], ...siblings };
}

/** Renders the schema as TypeScript. The root is wrapped so that every $def is emitted. */
export async function render() {
  const schema = JSON.parse(readFileSync(schemaPath, "utf8"));
  const root = {
    title: "WireProtocol",
    description: schema.description,
    type: "object",
    additionalProperties: false,
    properties: {
      server: { $ref: "#/$defs/ServerMessage" },
      client: { $ref: "#/$defs/ClientMessage" },
    },
    $defs: refsWithSiblings(schema.$defs),
  };
  const ts = await compile(root, "WireProtocol", {
    bannerComment: BANNER,
    unreachableDefinitions: true,
    additionalProperties: false,
    strictIndexSignatures: true,
    unknownAny: true,
    format: true,
  });
  // The generator notes on every type where it came from; the names say that already.
  const types = ts
    .replace(
      /\n \*\n \* This interface was referenced by `WireProtocol`'s JSON-Schema\n \* via the `definition` "\w+"\./g,
      "",
    )
    .replace(
      /\/\*\*\n \* This interface was referenced by `WireProtocol`'s JSON-Schema\n \* via the `definition` "\w+"\.\n \*\/\n/g,
      "",
    );
  return types + constants(schema.$defs);
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const ts = await render();
  if (process.argv.includes("--check")) {
    if (readFileSync(outPath, "utf8") !== ts) {
      console.error(`${outPath} is out of date with ${schemaPath}: run \`npm run gen:types\``);
      process.exit(1);
    }
  } else {
    writeFileSync(outPath, ts);
  }
}
