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
    $defs: schema.$defs,
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
  return ts
    .replace(
      /\n \*\n \* This interface was referenced by `WireProtocol`'s JSON-Schema\n \* via the `definition` "\w+"\./g,
      "",
    )
    .replace(
      /\/\*\*\n \* This interface was referenced by `WireProtocol`'s JSON-Schema\n \* via the `definition` "\w+"\.\n \*\/\n/g,
      "",
    );
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
