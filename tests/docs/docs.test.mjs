// The documents, checked without a server (scripts/test runs this once, before the majors):
// README.md stays short, every link and anchor resolves, every path the documents name exists,
// and the README's figures are BENCHMARKS.md's.
import assert from "node:assert/strict";
import { existsSync, readFileSync, readdirSync } from "node:fs";
import { dirname, join, normalize } from "node:path";
import test from "node:test";

const root = new URL("../..", import.meta.url).pathname;
const read = (f) => readFileSync(join(root, f), "utf8");
const DOCS = ["README.md", "BENCHMARKS.md", "CHANGELOG.md", ...readdirSync(join(root, "docs")).filter((f) => f.endsWith(".md")).map((f) => `docs/${f}`)];

// GitHub's heading anchors: lower case, punctuation other than - and _ dropped, spaces to -.
const slug = (h) => h.trim().toLowerCase().replace(/[^\p{L}\p{N}\- _]/gu, "").replace(/ /g, "-");
// Fenced blocks hold transcripts and code, not links or headings.
const prose = (text) => text.replace(/^```[\s\S]*?^```/gm, "");
const anchors = (f) => new Set(prose(read(f)).split("\n").filter((l) => /^#{1,6} /.test(l)).map((l) => slug(l.replace(/^#+ /, ""))));

test("README.md is at most 300 lines", () => {
  const n = read("README.md").split("\n").length - 1;
  assert.ok(n <= 300, `README.md has ${n} lines`);
});

test("every relative link and anchor in the documents resolves", () => {
  for (const f of DOCS) {
    for (const [, target] of prose(read(f)).matchAll(/\]\(([^)\s]+)\)/g)) {
      if (/^[a-z]+:/.test(target)) continue;
      const [path, anchor] = target.split("#");
      const file = path ? normalize(join(dirname(f), path)) : f;
      assert.ok(existsSync(join(root, file)), `${f}: link to ${target}: ${file} does not exist`);
      if (anchor) assert.ok(anchors(file).has(anchor), `${f}: link to ${target}: ${file} has no heading #${anchor}`);
    }
  }
});

test("every path the documents name exists", () => {
  const top = /^(scripts|tests|docs|src|core|docker|bench|sql|fuzz|\.ci)\//;
  for (const f of ["README.md", ...DOCS.filter((d) => d.startsWith("docs/"))]) {
    for (const [, inner] of read(f).matchAll(/`([^`\n]+)`/g)) {
      for (const word of inner.split(/[\s,;()]+/)) {
        const p = word.replace(/[.:]$/, "");
        if (!top.test(p) || /[<>*$…{}]|NN|\[/.test(p)) continue;   // placeholders and globs
        assert.ok(existsSync(join(root, p)), `${f} names ${p}, which does not exist`);
      }
    }
  }
});

test("the README's figures are BENCHMARKS.md's", () => {
  const figures = (text) => [...text.matchAll(/(\d+(?:\.\d+)?)×/g)].map((m) => m[1]);
  const bench = figures(read("BENCHMARKS.md")).map(Number);
  const readme = figures(prose(read("README.md")));
  assert.ok(readme.length > 0, "the README quotes figures");
  for (const x of readme) {
    const d = (x.split(".")[1] ?? "").length;
    assert.ok(bench.some((y) => y.toFixed(d) === x), `README's ${x}× is not a figure of BENCHMARKS.md (rounded to ${d} decimals)`);
  }
});

test("every document section a HINT or message names exists", () => {
  // `see the README, \"Configuring the key\"` or `see docs/install.md, \"Preloading is required\"`
  const src = read("src/errors.rs").replace(/\\\n\s*/g, "");   // Rust's line continuations
  const refs = [...src.matchAll(/see (the README|docs\/[\w-]+\.md), \\"([^"\\]+)\\"/g)];
  assert.ok(refs.length >= 3, `src/errors.rs names document sections (${refs.length} found)`);
  for (const [, doc, section] of refs) {
    const file = doc === "the README" ? "README.md" : doc;
    assert.ok(existsSync(join(root, file)), `src/errors.rs names ${file}, which does not exist`);
    assert.ok(anchors(file).has(slug(section)), `src/errors.rs names the section "${section}" of ${file}, which has no such heading`);
  }
});
