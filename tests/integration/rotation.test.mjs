// Key rotation as production does it (README "Key rotation"): keys come only from the server's
// environment, so every step is a restart with new variables. Also: a wrong key, a bad
// ENCRYPTION_KEY_PREVIOUS entry, and a key with bytes that are not UTF-8 (accepted, as Node does).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { Cluster, TEST_KEY } from "./cluster.mjs";
import { encrypt, decrypt, fingerprint } from "../interop/gateway.mjs";

const OLD = TEST_KEY;
const NEW = randomBytes(32).toString("base64");
const WRONG = randomBytes(32).toString("base64");
const k = (b64) => Buffer.from(b64, "base64");
const N = 50;

const db = new Cluster("rotation", { port: 54442, env: { ENCRYPTION_KEY: OLD } });
before(() => db.start());
after(() => db.stop());

const report = () => Object.fromEntries(db.psql("SELECT state, keys FROM provider_keys_encryption_report()")
  .split("\n").map((l) => l.split("|")).map(([s, n]) => [s, Number(n)]));
const tokens = () => db.psql("SELECT token FROM provider_key ORDER BY id").split("\n");

test("rotation through restarts: old key -> new key + ENCRYPTION_KEY_PREVIOUS -> new key alone", () => {
  db.script(`CREATE TABLE provider_key (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
    INSERT INTO provider_key SELECT 'k' || lpad(i::text, 3, '0'), 'sk-rot-' || i, 'openai' FROM generate_series(1, ${N - 1}) i;`);
  // one row written by the gateway's Node code under the old key
  db.psql(`INSERT INTO provider_key VALUES ('k999', '${encrypt("sk-from-node", k(OLD))}', 'openai')`);
  db.run("CALL encrypt_provider_keys(verbose => false)", { tuples: false });
  assert.equal(report().current_key, N);

  // step 1: the new key is current, the old one previous (the gateway gets the same pair)
  db.restart({ env: { ENCRYPTION_KEY: NEW, ENCRYPTION_KEY_PREVIOUS: OLD } });
  assert.equal(db.psql("SELECT provider_keys_encrypt_fingerprint()"), fingerprint(k(NEW)));
  assert.equal(db.psql("SELECT string_agg(key || '=' || fingerprint, ' ') FROM provider_keys_encrypt_keys()"),
    `current=${fingerprint(k(NEW))} previous 1=${fingerprint(k(OLD))}`);
  assert.equal(report().previous_key, N);
  assert.equal(db.psql("SELECT decrypt_token(token) FROM provider_key WHERE id = 'k999'"), "sk-from-node");
  const skip = db.run("CALL encrypt_provider_keys(verbose => false)", { tuples: false });
  assert.match(skip.err, /encrypted=0, skipped=50, errors=0, previous_key=50/);
  const rotated = db.run("CALL reencrypt_provider_keys(verbose => false)", { tuples: false });
  assert.equal(report().current_key, N);
  assert.equal(report().previous_key ?? 0, 0);
  // the run says what to do next, and step 2 does exactly that (issue 21, item 9: 0.2.0 said
  // to empty provider_keys_encrypt.previous_keys, a setting that refuses every value)
  assert.match(rotated.err, /No provider key needs a previous key any more: ENCRYPTION_KEY_PREVIOUS can be removed from the server's environment \(it is read at server start: the change takes effect at the next restart\), or from what provider_keys_encrypt.key_command prints \(the change takes effect at the next SELECT pg_reload_conf\(\)\)/);
  assert.doesNotMatch(rotated.err, /previous_keys can be emptied/);
  for (const t of tokens()) assert.match(decrypt(t, k(NEW)), /^sk-(rot-\d+|from-node)$/);

  // step 2, following that NOTICE: the old key leaves the environment, and the server restarts
  db.restart({ env: { ENCRYPTION_KEY: NEW } });
  assert.equal(db.psql("SELECT count(*) FROM provider_key WHERE decrypt_token(token) LIKE 'sk-%'"), String(N));
  assert.match(db.psql("SHOW provider_keys_encrypt.previous_keys"), /^none/);
});

test("a wrong key: every token is unverified, decrypt_token says which hint applies, nothing is touched", () => {
  const before = tokens();
  db.restart({ env: { ENCRYPTION_KEY: WRONG } });
  try {
    assert.equal(report().unverified, N);
    const r = db.run("SELECT decrypt_token(token) FROM provider_key LIMIT 1", { allowFail: true, verbose: true });
    assert.match(r.err, /ERROR:  22000: token does not authenticate/);
    assert.match(r.err, /HINT:  .*ENCRYPTION_KEY_PREVIOUS/);
    db.run("CALL encrypt_provider_keys(encrypt_unverified => false, verbose => false)", { tuples: false });
    assert.deepEqual(tokens(), before);
  } finally {
    db.restart({ env: { ENCRYPTION_KEY: NEW } });
  }
});

test("a bad ENCRYPTION_KEY_PREVIOUS entry is named by position (22023), never echoed", () => {
  db.restart({ env: { ENCRYPTION_KEY: NEW, ENCRYPTION_KEY_PREVIOUS: `${OLD}, sk-not-a-key-4711` } });
  try {
    const r = db.run("SELECT provider_keys_encrypt_fingerprint()", { allowFail: true, verbose: true });
    assert.match(r.err, /ERROR:  22023: ENCRYPTION_KEY_PREVIOUS \(entry 2\) must be a 32-byte key, base64-encoded/);
    assert.ok(!r.err.includes("sk-not-a-key-4711") && !r.err.includes(OLD));
    assert.ok(!db.log().includes("sk-not-a-key-4711"));
    assert.match(db.psql("SHOW provider_keys_encrypt.previous_keys"), /^from ENCRYPTION_KEY_PREVIOUS, fingerprints [0-9a-f]{16}, invalid$/);
  } finally {
    db.restart({ env: { ENCRYPTION_KEY: NEW } });
  }
});

test("an ENCRYPTION_KEY with bytes that are not UTF-8 is read as Node reads it (the stray byte is skipped)", () => {
  // Node: Buffer.from(process.env.ENCRYPTION_KEY, "base64"), where the invalid byte became U+FFFD,
  // which base64 decoding skips: the same 32 bytes as NEW
  db.restart({ env: { ENCRYPTION_KEY: Buffer.concat([Buffer.from(NEW.slice(0, 20)), Buffer.from([0xff]), Buffer.from(NEW.slice(20))]) } });
  try {
    assert.equal(Buffer.from(NEW.slice(0, 20) + "\uFFFD" + NEW.slice(20), "base64").equals(k(NEW)), true);
    assert.equal(db.psql("SELECT provider_keys_encrypt_fingerprint()"), fingerprint(k(NEW)));
    assert.equal(db.psql("SELECT count(*) FROM provider_key WHERE decrypt_token(token) LIKE 'sk-%'"), String(N));
  } finally {
    db.restart({ env: { ENCRYPTION_KEY: NEW } });
  }
});
