// No plaintext and no key in the server log, ever (issue 21, item 6), acted out as an operator
// would, then checked by reading the whole server log:
//   - deferred checks: a DEFERRABLE INITIALLY DEFERRED unique constraint or a deferrable
//     constraint trigger fires at COMMIT, outside the engine's savepoints; its message (a
//     unique violation's DETAIL: "Key (token)=(sk-…) already exists.") must not reach the
//     log. The rows are reported instead (failing together: without a value), and left as
//     they were. Both formats, a CALL on its own and inside a transaction block.
//   - a refused SET/SET LOCAL/set_config/ALTER SYSTEM/ALTER ROLE/ALTER DATABASE/function SET
//     clause of each of the three settings: refused (55P02), and the value given is not in
//     the log (no STATEMENT: line, no CONTEXT: line quoting it).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Cluster, TEST_KEY } from "./cluster.mjs";

const SECRET = "log-secrecy-gateway-secret";
const db = new Cluster("log_secrecy", {
  port: 54450,
  env: { ENCRYPTION_KEY: TEST_KEY, GATEWAY_API_KEY_HASH_SECRET: SECRET },
  // PostgreSQL's defaults, spelled out: a failing statement is logged after its error
  conf: ["log_min_error_statement = error", "log_min_messages = warning", "log_statement = none"],
});
before(() => db.start());
after(() => db.stop());

// The log must hold none of these; `what` says what the value is.
function assertNotInLog(values, what) {
  const log = db.log();
  for (const v of values) assert.ok(!log.includes(v), `${what} ${JSON.stringify(v)} reached the server log:\n${log.split("\n").filter((l) => l.includes(v)).join("\n")}`);
}
const summary = (stderr, word) => {
  const m = stderr.match(new RegExp(`total=(\\d+), ${word}=(\\d+), skipped=(\\d+), errors=(\\d+)`));
  assert.ok(m, stderr);
  return { total: +m[1], done: +m[2], skipped: +m[3], errors: +m[4] };
};

function base64Table(name, plains) {
  db.psql(`CREATE TABLE ${name} (id text PRIMARY KEY, token text, provider text NOT NULL, status text DEFAULT 'active')`);
  db.psql(`INSERT INTO ${name} (id, token, provider) VALUES ${plains.map((p, i) => `('${i + 1}', encrypt_token('${p}'), 'openai')`).join(", ")}`);
}

test("decrypt: a deferred unique constraint on token with two equal plaintexts reports the rows, and the log holds neither plaintext", () => {
  const dup = "sk-deferred-dup-7f3a9c1e5b2d4086";
  const other = "sk-deferred-other-0c9e8d7f6a5b";
  base64Table("dk", [dup, dup, other]);
  db.psql("ALTER TABLE dk ADD CONSTRAINT dk_token_key UNIQUE (token) DEFERRABLE INITIALLY DEFERRED");
  const r = db.run("CALL decrypt_provider_keys('dk')");
  // the CALL succeeds; the batch's rows pass alone and fail together, so every row it would
  // write is reported as failing together (the engine cannot tell which pair), without a value
  const s = summary(r.err, "decrypted");
  assert.deepEqual(s, { total: 3, done: 0, skipped: 0, errors: 3 }, r.err);
  for (const id of ["1", "2", "3"]) assert.match(r.err, new RegExp(`WARNING:  Failed to decrypt provider key ${id} for provider openai: its write fails only together with other rows; left unchanged`));
  assert.ok(!r.err.includes(dup), r.err);
  assert.equal(db.psql("SELECT count(*) FROM dk WHERE is_encrypted_token(token)"), "3");
  assertNotInLog([dup, other], "a plaintext");

  // the same inside the caller's transaction block: nothing is left to fail at its COMMIT
  const b = db.run("BEGIN; CALL decrypt_provider_keys('dk'); COMMIT;");
  assert.deepEqual(summary(b.err, "decrypted"), { total: 3, done: 0, skipped: 0, errors: 3 }, b.err);
  assert.ok(!b.err.includes(dup), b.err);
  assert.equal(db.psql("SELECT count(*) FROM dk WHERE is_encrypted_token(token)"), "3");
  assertNotInLog([dup, other], "a plaintext");
});

test("decrypt inside a transaction block whose own earlier change fails a deferred check: one error up front, naming the constraint only", () => {
  const p = "sk-caller-pending-5e4d3c2b1a09";
  base64Table("dp", [p]);
  db.psql("ALTER TABLE dp ADD CONSTRAINT dp_token_key UNIQUE (token) DEFERRABLE INITIALLY DEFERRED");
  // the caller's own duplicate, written earlier in the same transaction, checked at COMMIT
  const r = db.run(`BEGIN; INSERT INTO dp SELECT '2', token, provider FROM dp WHERE id = '1'; CALL decrypt_provider_keys('dp');`,
    { allowFail: true, verbose: true });
  assert.notEqual(r.status, 0);
  assert.match(r.err, /ERROR:  23505: a deferred check of this transaction already fails \(constraint dp_token_key\), before the run wrote anything/);
  assert.ok(!/Failed to decrypt/.test(r.err), r.err);
  assert.equal(db.psql("SELECT count(*) FROM dp WHERE is_encrypted_token(token)"), "1");
  assertNotInLog([p], "a plaintext");
});

test("decrypt: a deferrable constraint trigger whose message quotes the row fails inside the run, its message scrubbed", () => {
  const p1 = "sk-trigger-quoted-1a2b3c4d5e6f", p2 = "sk-trigger-quoted-9f8e7d6c5b4a";
  base64Table("dt", [p1, p2]);
  db.psql(`CREATE FUNCTION dt_check() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.token LIKE 'sk-trigger-%' THEN
               RAISE EXCEPTION 'token % must not be stored in clear', NEW.token USING ERRCODE = 'check_violation';
             END IF;
             RETURN NULL;
           END $$`);
  db.psql(`CREATE CONSTRAINT TRIGGER dt_check AFTER UPDATE ON dt DEFERRABLE INITIALLY DEFERRED
           FOR EACH ROW EXECUTE FUNCTION dt_check()`);
  const r = db.run("CALL decrypt_provider_keys('dt')");
  assert.deepEqual(summary(r.err, "decrypted"), { total: 2, done: 0, skipped: 0, errors: 2 }, r.err);
  for (const id of ["1", "2"]) {
    assert.match(r.err, new RegExp(`WARNING:  Failed to decrypt provider key ${id} for provider openai \\(SQLSTATE 23514\\): token \\[redacted\\] must not be stored in clear`));
  }
  assert.ok(!r.err.includes(p1) && !r.err.includes(p2), r.err);
  assert.equal(db.psql("SELECT count(*) FROM dt WHERE is_encrypted_token(token)"), "2");
  assertNotInLog([p1, p2], "a plaintext");
});

test("llmgw encrypt: a deferred unique constraint on token_masked and two equal plaintexts: reported, and the mask is not in the log", () => {
  const dup = "sk-llmgw-masked-dup-4b5c6d7e8f90a1b2c3";
  db.psql(`CREATE TABLE lk (
      id text PRIMARY KEY, token text, token_ciphertext text, token_masked text, token_hash text,
      provider text NOT NULL, status text DEFAULT 'active', organization_id text,
      CONSTRAINT lk_masked_key UNIQUE (token_masked) DEFERRABLE INITIALLY DEFERRED)`);
  db.psql(`INSERT INTO lk (id, token, provider, organization_id) VALUES ('1', '${dup}', 'openai', 'org-1'), ('2', '${dup}', 'openai', 'org-1')`);
  const mask = db.psql(`SELECT llmgw_mask_token('${dup}')`);
  const hash = db.psql(`SELECT llmgw_token_hash('${dup}')`);
  assert.ok(mask.length >= 8, mask);
  const r = db.run("CALL encrypt_provider_keys('lk', format => 'llmgw')");
  assert.deepEqual(summary(r.err, "encrypted"), { total: 2, done: 0, skipped: 0, errors: 2 }, r.err);
  assert.match(r.err, /Failed to encrypt provider key 1 for provider openai: its write fails only together with other rows/);
  assert.ok(!r.err.includes(mask) && !r.err.includes(dup), r.err);
  assert.equal(db.psql("SELECT count(*) FROM lk WHERE token IS NOT NULL AND token_ciphertext IS NULL"), "2");
  assertNotInLog([dup, mask, hash], "a plaintext or what is computed from it");
});

// Each setting, each way of giving it a value: refused with 55P02, and the value is not in the log.
const SETTINGS = ["encryption_key", "previous_keys", "gateway_api_key_hash_secret"];
const WAYS = {
  set: (s, v) => `SET provider_keys_encrypt.${s} = '${v}';`,
  set_local: (s, v) => `BEGIN; SET LOCAL provider_keys_encrypt.${s} = '${v}'; ROLLBACK;`,
  set_config: (s, v) => `SELECT set_config('provider_keys_encrypt.${s}', '${v}', false);`,
  set_config_in_plpgsql: (s, v) => `DO $$ BEGIN PERFORM set_config('provider_keys_encrypt.${s}', '${v}', false); END $$;`,
  alter_system: (s, v) => `ALTER SYSTEM SET provider_keys_encrypt.${s} = '${v}';`,
  alter_role: (s, v) => `ALTER ROLE postgres SET provider_keys_encrypt.${s} = '${v}';`,
  alter_database: (s, v) => `ALTER DATABASE postgres SET provider_keys_encrypt.${s} = '${v}';`,
  function_set_clause: (s, v) => `CREATE FUNCTION leak_${s}() RETURNS int LANGUAGE sql SET provider_keys_encrypt.${s} = '${v}' AS 'SELECT 1';`,
};

test("a refused SET of a key setting, every way and every setting: 55P02, and the value is not in the server log", () => {
  const values = [];
  let n = 0;
  for (const s of SETTINGS) {
    for (const [way, sql] of Object.entries(WAYS)) {
      const v = `S3cr3tValue${way}${s}${++n}AAAAAAAAAAAAAAAAAAAAAAAA=`;
      values.push(v);
      const r = db.probe(`\\set VERBOSITY verbose\n${sql(s, v)}\n`);
      assert.match(r.err, new RegExp(`ERROR:  55P02: provider_keys_encrypt\\.${s} cannot be set`), `${way} ${s}: ${r.err}`);
    }
  }
  // the refusals reached the log (so the log is where we look), their values did not
  const logged = db.log().split("\n").filter((l) => /ERROR:  provider_keys_encrypt\.\w+ cannot be set/.test(l)).length;
  assert.equal(logged, SETTINGS.length * Object.keys(WAYS).length, db.log());
  assertNotInLog(values, "a refused key value");
  // nothing was stored anywhere by the refusals
  assert.equal(db.psql("SELECT count(*) FROM pg_db_role_setting, unnest(setconfig) c WHERE c LIKE 'provider_keys_encrypt.%'"), "0");
  assert.equal(db.psql("SELECT count(*) FROM pg_proc WHERE proname LIKE 'leak_%'"), "0");

  // the hook hides exactly the refusals: another error keeps its STATEMENT: line
  const marker = "not_a_refusal_marker_31337";
  db.run(`SELECT 1/0 AS ${marker}`, { allowFail: true });
  assert.match(db.log(), new RegExp(`STATEMENT:  SELECT 1/0 AS ${marker}`));
  // a user's own RAISE with the refusal's words and SQLSTATE is not hidden either
  db.run(`DO $$ BEGIN RAISE EXCEPTION 'provider_keys_encrypt.encryption_key cannot be set: provider_keys_encrypt reads keys only from the server''s environment (ENCRYPTION_KEY) ${marker}2' USING ERRCODE = '55P02'; END $$`, { allowFail: true });
  assert.match(db.log(), new RegExp(`STATEMENT:  DO .*${marker}2`));
});

test("reencrypt: a deferrable constraint trigger that refuses the rotation fails inside the run: rows reported, the stored token scrubbed, nothing fails at COMMIT", () => {
  const p1 = "sk-rotate-deferred-aa11bb22cc33";
  base64Table("dr", [p1]);
  const stored = db.psql("SELECT token FROM dr WHERE id = '1'");
  db.psql(`CREATE FUNCTION dr_check() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             RAISE EXCEPTION 'rotation of % refused', OLD.token USING ERRCODE = 'check_violation';
           END $$`);
  db.psql(`CREATE CONSTRAINT TRIGGER dr_check AFTER UPDATE ON dr DEFERRABLE INITIALLY DEFERRED
           FOR EACH ROW EXECUTE FUNCTION dr_check()`);
  // rotate: the test key becomes the previous one
  db.restart({ env: { ENCRYPTION_KEY: "bmV3LWtleS1sb2ctc2VjcmVjeS10ZXN0LTMyYnl0ZXM=", ENCRYPTION_KEY_PREVIOUS: TEST_KEY, GATEWAY_API_KEY_HASH_SECRET: SECRET } });
  const r = db.run("CALL reencrypt_provider_keys('dr')");
  assert.match(r.err, /errors=1/, r.err);
  assert.match(r.err, /WARNING:  Failed to re-?encrypt provider key 1 for provider openai \(SQLSTATE 23514\): rotation of \[redacted\] refused/, r.err);
  assert.ok(!r.err.includes(stored), r.err);
  assert.equal(db.psql("SELECT token FROM dr WHERE id = '1'"), stored, "left unchanged");
  assertNotInLog([p1, stored], "a plaintext or the stored token");
});

test("the guard's refusal of a plaintext write leaves the statement, which holds the plaintext, out of the log", () => {
  const plain = "sk-guard-refused-4e1d2c3b9a87";
  db.psql("CREATE TABLE gr (id text PRIMARY KEY, token text, provider text NOT NULL, status text DEFAULT 'active')");
  db.psql(`CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token, status ON gr
           FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard('mode=reject')`);
  const r = db.run(`INSERT INTO gr VALUES ('g1', '${plain}', 'openai')`, { allowFail: true, verbose: true });
  assert.notEqual(r.status, 0, "the guard refuses the plaintext");
  assert.match(r.err, /ERROR:  23000: /, r.err);
  assert.equal(db.psql("SELECT count(*) FROM gr"), "0");
  // the refusal itself is logged, without its statement
  assert.match(db.log(), /ERROR:  provider key g1 .*|ERROR:  .*g1/);
  assertNotInLog([plain], "a plaintext the guard refused");
  // control: another error's statement is still logged
  const marker = "stmt-still-logged-31d7";
  db.run(`SELECT 1/0 AS "${marker}"`, { allowFail: true });
  assert.ok(db.log().includes(marker), "another error keeps its STATEMENT line");
});
