/**
 * The package as a user gets it: `npm pack`, installed from the tarball into an empty project
 * (offline: it has no runtime dependencies), type-checked there, and the README's hello world
 * run against the real server.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { PACKAGE_ROOT, PYTHON, STUB_ENV, applyEnv, serverEnv } from "./helpers.js";

const NPM = process.platform === "win32" ? "npm.cmd" : "npm";

interface Packed {
  filename: string;
  files: Array<{ path: string }>;
}

/** Packs the package into `dir` (building it first, as prepack does); returns what went in. */
function pack(dir: string): Packed {
  const out = execFileSync(NPM, ["pack", "--json", "--pack-destination", dir], {
    cwd: PACKAGE_ROOT,
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
  });
  // Build output from prepack precedes the JSON on stdout.
  return (JSON.parse(out.slice(out.indexOf("\n[") + 1)) as Packed[])[0] as Packed;
}

/** The README's first code block in `language`: for js, the hello world a newcomer pastes. */
function readmeBlock(language: "js" | "ts"): string {
  const readme = readFileSync(join(PACKAGE_ROOT, "README.md"), "utf8");
  const match = new RegExp("```" + language + "\n([\\s\\S]*?)```").exec(readme);
  assert.ok(match?.[1], `README.md has no \`\`\`${language} block`);
  return match[1];
}

test("the packed package installs from its tarball, type-checks the README, and runs its hello world", async () => {
  const dir = mkdtempSync(join(tmpdir(), "rlm-pack-"));
  const packed = pack(dir);
  const files = new Set(packed.files.map((file) => file.path));
  for (const path of ["package.json", "README.md", "LICENSE", "dist/index.js", "dist/index.d.ts"]) {
    assert.ok(files.has(path), `${path} is not in the package`);
  }
  for (const map of [...files].filter((path) => path.endsWith(".js.map"))) {
    const { sources } = JSON.parse(readFileSync(join(PACKAGE_ROOT, map), "utf8")) as { sources: string[] };
    for (const source of sources) {
      const shipped = join(map, "..", source);
      assert.ok(files.has(shipped), `${map} points at ${shipped}, which is not in the package`);
    }
  }

  const project = join(dir, "project");
  mkdirSync(project);
  writeFileSync(
    join(project, "package.json"),
    JSON.stringify({ name: "hello", private: true, type: "module" }),
  );
  execFileSync(NPM, ["install", "--offline", "--no-audit", "--no-fund", join(dir, packed.filename)], {
    cwd: project,
    stdio: "pipe",
  });

  writeFileSync(join(project, "hello.mjs"), readmeBlock("js"));
  writeFileSync(join(project, "hello.ts"), readmeBlock("js"));
  writeFileSync(join(project, "example.ts"), readmeBlock("ts"));
  const tsc = join(PACKAGE_ROOT, "node_modules/typescript/bin/tsc");
  const typeRoots = join(PACKAGE_ROOT, "node_modules/@types");
  // The shipped declarations, resolved through the exports map as a NodeNext project does; the
  // README's hello world and its longer example both compile against them.
  execFileSync(
    process.execPath,
    [
      tsc,
      "--noEmit",
      "--strict",
      "--module",
      "nodenext",
      "--target",
      "es2022",
      "--typeRoots",
      typeRoots,
      "hello.ts",
      "example.ts",
    ],
    { cwd: project, stdio: "pipe" },
  );

  const out = execFileSync(process.execPath, ["hello.mjs"], {
    cwd: project,
    encoding: "utf8",
    env: applyEnv({ ...serverEnv(STUB_ENV), ELIZA_RLM_PYTHON_PATH: PYTHON }),
  });
  assert.match(out, /\[RLM STUB\]/);
});
