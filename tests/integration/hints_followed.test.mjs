// Every HINT the suite can trigger names an action that works on this version (issue 21,
// item 9): each distinct HINT line in the golden sessions (tests/pg_regress/expected/*.out) is
// either followed in a session — a line starting with "-- following the HINT" (or "that HINT")
// within the next 12 lines, after which the session carries out what the HINT says and shows the
// retry working — or listed in tests/pg_regress/hints_elsewhere.txt with where it is followed
// instead (an integration test, for a restart or an environment variable) or why it names no
// action to try. A new HINT without either fails here. No server needed.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";

const ROOT = new URL("../..", import.meta.url).pathname;
const EXPECTED = join(ROOT, "tests/pg_regress/expected");
const ELSEWHERE = join(ROOT, "tests/pg_regress/hints_elsewhere.txt");

// hints_elsewhere.txt: "<regular expression>\t<where it is followed, or why there is nothing to follow>"
const elsewhere = readFileSync(ELSEWHERE, "utf8").split("\n")
  .filter((l) => l.trim() && !l.startsWith("#"))
  .map((l) => {
    const [pattern, why] = l.split("\t");
    assert.ok(why && why.trim().length > 10, `hints_elsewhere.txt: every entry says where or why: ${l}`);
    return { re: new RegExp(pattern), why };
  });

// One HINT for every table or role it names: object and role names are folded, so that
// following the HINT for one table follows it for another.
const fold = (h) => h.replace(/\b[\w$]+\.[\w$"]+(\([^)]*\))?/g, "<obj>")
  .replace(/\b(ROLE|TO|FROM|ON|TABLE|CONSTRAINT|RULE|TRIGGER) [\w"]+/g, "$1 <name>");

function hints() {
  const found = new Map(); // hint -> { followed, where }
  for (const f of readdirSync(EXPECTED).filter((n) => n.endsWith(".out") && !/_\d+\.out$/.test(n))) {
    const lines = readFileSync(join(EXPECTED, f), "utf8").split("\n");
    lines.forEach((l, i) => {
      if (!l.startsWith("HINT:  ")) return;
      const hint = fold(l.slice(7));
      const followed = lines.slice(i + 1, i + 13).some((n) => /^-- following (the|that) HINT/.test(n));
      const h = found.get(hint) ?? { followed: false, where: `${f}:${i + 1}` };
      h.followed ||= followed;
      found.set(hint, h);
    });
  }
  return found;
}

test("every HINT in the golden sessions is followed in a session, or listed with where it is followed", () => {
  const all = hints();
  assert.ok(all.size > 20, `the goldens hold HINTs (${all.size})`);
  const unfollowed = [...all].filter(([hint, h]) => !h.followed && !elsewhere.some((e) => e.re.test(hint)));
  assert.deepEqual(unfollowed.map(([hint, h]) => `${h.where}: ${hint}`), []);
});

test("hints_elsewhere.txt lists only HINTs the goldens still print", () => {
  const all = [...hints().keys()];
  const stale = elsewhere.filter((e) => !all.some((h) => e.re.test(h)));
  assert.deepEqual(stale.map((e) => e.re.source), []);
});

test("no HINT names a setting that refuses every value, or an unqualified procedure call", () => {
  for (const [hint, h] of hints()) {
    assert.doesNotMatch(hint, /previous_keys can be emptied|SET provider_keys_encrypt\./, `${h.where}: ${hint}`);
    assert.doesNotMatch(hint, /CALL (encrypt|decrypt|reencrypt)_provider_keys\(/, `${h.where}: unqualified call: ${hint}`);
  }
});
