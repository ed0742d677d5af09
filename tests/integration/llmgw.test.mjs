// The gateway's current format (llmgw) against a real server and the gateway's own crypto in
// real Node (tests/interop/llmgw_gateway.mjs, node:crypto): tokens Node writes open in SQL; the
// backfill (CALL encrypt_provider_keys(format => 'llmgw')) on the gateway's rollout schema is
// read back by Node row by row; no lost update under concurrent writers; a failing row alone is
// rolled back; the rollback to plaintext; the gateway's next migration, then rotation on its
// final schema under a new secret, read back by Node with the old secret gone.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { Cluster, sleep } from "./cluster.mjs";
import * as gw from "../interop/llmgw_gateway.mjs";

const OLD = "integration-gateway-secret-old-ünïcode";
const NEW = "integration-gateway-secret-new";
// wal_writer_delay = 10s: the durable-finish test below must not be rescued by the WAL writer
const db = new Cluster("llmgw", { port: 54445, env: { GATEWAY_API_KEY_HASH_SECRET: OLD }, conf: ["wal_writer_delay = 10s"] });
before(() => db.start());
after(() => db.stop());

// Restart the server with another keyring (the environment is read once per backend).
function restartWith(secrets) {
  db.stop();
  db.env = { GATEWAY_API_KEY_HASH_SECRET: secrets };
  db.pgctl(["-l", join(db.dir, "server.log"), "-w", "start"]);
}

// What the database stores for a mask (a cut surrogate pair becomes U+FFFD on the way in).
const stored = (s) => Buffer.from(s, "utf8").toString("utf8");

// Deterministic test data (xorshift32; not cryptography).
let seed = 0x9e3779b9;
const rnd = (n) => { seed ^= seed << 13; seed >>>= 0; seed ^= seed >>> 17; seed ^= seed << 5; seed >>>= 0; return seed % n; };
const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";
const word = (n) => Array.from({ length: n }, () => alphabet[rnd(alphabet.length)]).join("");
function plaintext(i) {
  switch (i % 8) {
    case 0: return i === 0 ? "" : `sk-proj-${word(40 + rnd(60))}`;
    case 1: return `sk-ant-api03-${word(90)}`;
    case 2: return word(1 + rnd(6));                      // shorter than the mask's 4 + 12
    case 3: return `0123456789a🔑${word(8)}`;              // the mask cuts the surrogate pair
    case 4: return `ключ-${word(20)}-中文-é`;
    case 5: return `AIza${word(35)}`;
    case 6: return "llmgw-looking-but-not:" + word(10);   // not the "llmgw:" prefix
    default: return word(64);
  }
}
const org = (i) => (i % 5 === 0 ? null : `org-${i % 17}`);
const status = (i) => ["active", "active", "inactive", "deleted"][i % 4];

const summary = (stderr, word = "encrypted") => {
  const m = stderr.match(new RegExp(`total=(\\d+), ${word}=(\\d+), skipped=(\\d+), errors=(\\d+)`));
  assert.ok(m, stderr);
  return { total: +m[1], done: +m[2], skipped: +m[3], errors: +m[4] };
};

// The gateway's rollout schema (token nullable, the three new columns, XOR constraint) plus the
// seed guide's columns.
function createTable(name, { xor = true } = {}) {
  db.psql(`CREATE TABLE ${name} (
      id text PRIMARY KEY,
      created_at timestamptz NOT NULL DEFAULT now(),
      updated_at timestamptz NOT NULL DEFAULT now(),
      token text,
      token_ciphertext text,
      token_masked text,
      token_hash text,
      provider text NOT NULL,
      base_url text,
      status text DEFAULT 'active',
      organization_id text,
      managed boolean NOT NULL DEFAULT false
      ${xor ? `, CONSTRAINT ${name}_token_xor CHECK ((token IS NULL) <> (token_ciphertext IS NULL))` : ""})`);
}

// rows: {id, org, status, plain, ct?} -> the table, with a distinct updated_at per row
function fill(name, rows) {
  db.loadJson(`${name}_src`, rows.map((r, i) => ({ ...r, updated: new Date(Date.UTC(2024, 0, 1) + i * 61_000).toISOString() })));
  db.psql(`INSERT INTO ${name} (id, token, token_ciphertext, token_hash, token_masked, provider, status, organization_id, managed, updated_at)
           SELECT doc->>'id', CASE WHEN doc ? 'ct' THEN NULL ELSE doc->>'plain' END, doc->>'ct', doc->>'hash', doc->>'mask',
                  'openai', doc->>'status', doc->>'org', doc->>'org' IS NULL, (doc->>'updated')::timestamptz
             FROM ${name}_src`);
}

// Every row of the table, read back and checked by Node under `secrets`: the ciphertext opens
// for its row to the original plaintext, token_hash and token_masked are the gateway's.
function readBack(name, plains, secrets, { hasToken = true } = {}) {
  const ring = gw.keyring(secrets);
  const rows = db.readJson(`SELECT json_build_object('id', id, 'org', organization_id, 'ct', token_ciphertext,
                                   'hash', token_hash, 'mask', token_masked${hasToken ? ", 'token', token" : ""}) FROM ${name}`);
  for (const r of rows) {
    const p = plains.get(r.id);
    if (hasToken) assert.equal(r.token, null, `row ${r.id}: token is NULL`);
    assert.equal(gw.decrypt(ring, r.ct, r.id, r.org), p, `row ${r.id}: Node opens its ciphertext`);
    assert.equal(r.hash, gw.tokenHash(ring, p), `row ${r.id}: token_hash`);
    assert.equal(r.mask, stored(gw.mask(p)), `row ${r.id}: token_masked`);
  }
  return rows;
}

// A psql session driven step by step (to hold a row lock while the CALL runs).
function session(appName) {
  const child = spawn(`${process.env.PKE_PG_BIN}/psql`, [...db.args(), "-At", "-f", "-"],
    { stdio: ["pipe", "pipe", "pipe"], env: { ...process.env, PGAPPNAME: appName } });
  let out = "", err = "", n = 0;
  child.stdout.on("data", (d) => (out += d));
  child.stderr.on("data", (d) => (err += d));
  const closed = new Promise((resolve) => child.on("close", resolve));
  return {
    async run(sql) {
      const mark = `step-done-${n++}`;
      child.stdin.write(`${sql}\n\\echo ${mark}\n`);
      while (!out.includes(mark)) {
        if (child.exitCode !== null) throw new Error(`session ${appName} ended: ${err}`);
        await sleep(20);
      }
    },
    async end() { child.stdin.end(); await closed; return err; },
  };
}

async function until(what, cond) {
  for (let i = 0; i < 3000; i++) {  // a guard against hanging, not a timing assertion
    if (cond()) return;
    await sleep(20);
  }
  throw new Error(`never happened: ${what}`);
}

const N = 1200;       // plaintext rows to move
const NODE_ROWS = 200; // rows the gateway already wrote in the new format
const plains = new Map();

test("tokens the gateway's Node code writes (v2 and v1) open with llmgw_decrypt_token; errors have their SQLSTATEs", () => {
  const ring = gw.keyring(OLD);
  const docs = Array.from({ length: 1000 }, (_, i) => {
    const p = plaintext(i + 7), id = `node-${i}`, o = org(i);
    return { id, org: o, plain: p, token: gw.encrypt(ring, p, id, o, i % 3 === 0 ? "v1" : "v2") };
  });
  db.loadJson("from_node", docs);
  assert.equal(db.psql("SELECT llmgw_key_id()"), gw.keyId(OLD));
  assert.equal(db.psql("SELECT count(*) FROM from_node WHERE llmgw_decrypt_token(doc->>'token', doc->>'id', doc->>'org') = doc->>'plain'"), "1000");
  // the database's tokens open in Node
  const back = db.readJson(`SELECT json_build_object('id', doc->>'id', 'org', doc->>'org', 'plain', doc->>'plain',
                                   't', llmgw_encrypt_token(doc->>'plain', doc->>'id', doc->>'org'),
                                   'h', llmgw_token_hash(doc->>'plain'), 'm', llmgw_mask_token(doc->>'plain')) FROM from_node`);
  for (const r of back) {
    assert.equal(gw.decrypt(ring, r.t, r.id, r.org), r.plain);
    assert.equal(r.h, gw.tokenHash(ring, r.plain));
    assert.equal(r.m, stored(gw.mask(r.plain)));
  }
  // error causes, each with its SQLSTATE (the golden session llmgw.sql shows the messages)
  const t = docs[1].token; // v2, row node-1
  const otherKid = gw.encrypt(gw.keyring("a secret this server does not have"), "sk-x", "node-1", docs[1].org);
  const cases = [
    ["another row", `SELECT llmgw_decrypt_token('${t}', 'node-2', '${docs[1].org}')`, "22000"],
    ["another organization", `SELECT llmgw_decrypt_token('${t}', 'node-1', 'org-999')`, "22000"],
    ["a key id not in the keyring", `SELECT llmgw_decrypt_token('${otherKid}', 'node-1', '${docs[1].org}')`, "22023"],
    ["an unknown version", `SELECT llmgw_decrypt_token('${t.replace("llmgw:v2:", "llmgw:v9:")}', 'node-1', '${docs[1].org}')`, "0A000"],
    ["a malformed token", `SELECT llmgw_decrypt_token('${t.split(":").slice(0, 5).join(":")}', 'node-1', '${docs[1].org}')`, "22P02"],
    ["a NULL id", `SELECT llmgw_encrypt_token('sk', NULL, 'org')`, "22004"],
  ];
  for (const [what, sql, code] of cases) {
    const r = db.run(sql, { allowFail: true, verbose: true });
    assert.notEqual(r.status, 0, what);
    assert.match(r.err, new RegExp(`ERROR:  ${code}:`), `${what}: ${r.err}`);
    assert.ok(!r.err.includes(docs[1].plain) && !r.err.includes(OLD), `${what}: no plaintext, no secret`);
  }
  // with another keyring (a restart without GATEWAY_API_KEY_HASH_SECRET): a clear 55000
  restartWith("");
  const r = db.run("SELECT llmgw_key_id()", { allowFail: true, verbose: true });
  assert.match(r.err, /ERROR:  55000: GATEWAY_API_KEY_HASH_SECRET is not set/);
  restartWith(OLD);
});

test(`the backfill moves ${N} plaintext rows in one CALL; Node reads every row back`, () => {
  createTable("provider_key");
  const ring = gw.keyring(OLD);
  const rows = [];
  for (let i = 0; i < N + NODE_ROWS; i++) {
    const id = `pk_${String(i).padStart(5, "0")}`, p = plaintext(i), o = org(i);
    plains.set(id, p);
    const r = { id, org: o, status: status(i), plain: p };
    if (i >= N) Object.assign(r, { ct: gw.encrypt(ring, p, id, o), hash: gw.tokenHash(ring, p), mask: stored(gw.mask(p)) });
    rows.push(r);
  }
  fill("provider_key", rows);
  const nodeWritten = db.psql("SELECT md5(string_agg(token_ciphertext, ',' ORDER BY id)) FROM provider_key WHERE token IS NULL");

  // dry run: nothing written
  const dry = db.run("CALL encrypt_provider_keys(format => 'llmgw', dry_run => true, verbose => false)", { tuples: false });
  assert.deepEqual(summary(dry.err), { total: N + NODE_ROWS, done: N, skipped: NODE_ROWS, errors: 0 });
  assert.equal(db.psql("SELECT count(*) FROM provider_key WHERE token IS NOT NULL"), String(N));

  const run = db.run("CALL encrypt_provider_keys(format => 'llmgw', batch_size => 100, verbose => false)", { tuples: false });
  assert.deepEqual(summary(run.err), { total: N + NODE_ROWS, done: N, skipped: NODE_ROWS, errors: 0 });
  assert.match(run.err, /soft-deleted ones included: the gateway's next migration sets token_ciphertext, token_hash and token_masked NOT NULL on every row/);
  // this server has no ENCRYPTION_KEY: the run says it cannot recognise base64 tokens in token
  assert.match(run.err, /NOTICE: {2}ENCRYPTION_KEY is not set on this server: a token of format base64 .* set ENCRYPTION_KEY and run again\./);
  assert.ok(!/sk-proj-|sk-ant-|ключ/.test(run.err), "no plaintext in the messages");

  const back = readBack("provider_key", plains, OLD);
  assert.equal(back.length, N + NODE_ROWS);
  assert.equal(db.psql("SELECT count(*) FROM provider_key WHERE status = 'deleted' AND token IS NULL"), String((N + NODE_ROWS) / 4),
    "soft-deleted rows moved too");
  assert.equal(db.psql(`SELECT count(*) FROM provider_key p JOIN provider_key_src s ON s.doc->>'id' = p.id
                         WHERE p.updated_at = (s.doc->>'updated')::timestamptz`), String(N + NODE_ROWS), "updated_at kept");
  assert.equal(db.psql("SELECT md5(string_agg(token_ciphertext, ',' ORDER BY id)) FROM provider_key WHERE id >= 'pk_01200'"), nodeWritten,
    "rows the gateway had written are untouched");
  // batched commits: one transaction per batch of 100
  assert.ok(Number(db.psql("SELECT count(DISTINCT xmin::text) FROM provider_key WHERE id < 'pk_01200'")) >= N / 100);
  // idempotent
  const again = db.run("CALL encrypt_provider_keys(format => 'llmgw', verbose => false)", { tuples: false });
  assert.deepEqual(summary(again.err), { total: N + NODE_ROWS, done: 0, skipped: N + NODE_ROWS, errors: 0 });
  assert.equal(db.psql("SELECT string_agg(state || ':' || coalesce(key_id, '-') || ':' || keys, ' ') FROM provider_keys_encryption_report()"),
    `plaintext:-:0 current_key:${gw.keyId(OLD)}:${N + NODE_ROWS} previous_key:-:0 unverified:-:0`);
});

test("no lost update: rows the application or the gateway change mid-run end as they wrote them", async () => {
  createTable("lu");
  const rows = Array.from({ length: 30 }, (_, i) => ({ id: `r${String(i).padStart(2, "0")}`, org: org(i), status: "active", plain: `sk-lu-${i}-${word(20)}` }));
  fill("lu", rows);
  const ring = gw.keyring(OLD);
  const o07 = rows[7].org;
  const gwToken = gw.encrypt(ring, "sk-gateway-wrote-07", "r07", o07);
  // the application changes r05's key, the gateway writes r07 in the new format: both hold
  // their row lock, uncommitted, while the run reads its batch and tries to write them
  const app = session("lu_app"), gateway = session("lu_gateway");
  await app.run("BEGIN; UPDATE lu SET token = 'sk-app-new-value-05' WHERE id = 'r05';");
  await gateway.run(`BEGIN; UPDATE lu SET token = NULL, token_ciphertext = '${gwToken}',
                       token_hash = '${gw.tokenHash(ring, "sk-gateway-wrote-07")}', token_masked = 'sk-gateway-w•••••' WHERE id = 'r07';`);
  const call = db.background("CALL encrypt_provider_keys('lu', format => 'llmgw', batch_size => 100, verbose => false)", { appName: "lu_call" });
  await until("the run waits on a row lock", () =>
    db.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'lu_call' AND wait_event_type = 'Lock'") === "1");
  await app.run("COMMIT;");
  await gateway.run("COMMIT;");
  assert.equal(await app.end(), "");
  assert.equal(await gateway.end(), "");
  const r = await call.done;
  assert.equal(r.status, 0, r.err);
  assert.match(r.err, /total=30, encrypted=29, skipped=1, errors=0, changed_concurrently=1/);
  const got = Object.fromEntries(db.readJson("SELECT json_build_object('id', id, 'org', organization_id, 'ct', token_ciphertext, 'token', token, 'hash', token_hash) FROM lu").map((x) => [x.id, x]));
  assert.equal(gw.decrypt(ring, got.r05.ct, "r05", got.r05.org), "sk-app-new-value-05", "the application's new value was sealed, not the old one");
  assert.equal(got.r05.hash, gw.tokenHash(ring, "sk-app-new-value-05"));
  assert.equal(got.r07.ct, gwToken, "the gateway's own write is kept");
  for (const row of rows) if (row.id !== "r05" && row.id !== "r07") assert.equal(gw.decrypt(ring, got[row.id].ct, row.id, row.org), row.plain);
  assert.ok(Object.values(got).every((x) => x.token === null));
});

test("without the XOR constraint: a failing row is rolled back alone, its secrets scrubbed; the rollback restores plaintext", () => {
  createTable("nx", { xor: false });
  const rows = Array.from({ length: 40 }, (_, i) => ({ id: `x${String(i).padStart(2, "0")}`, org: org(i), status: status(i), plain: `sk-nx-${i}-NXPLAIN-${word(12)}` }));
  fill("nx", rows);
  db.psql(`CREATE FUNCTION nx_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.id = 'x13' THEN RAISE EXCEPTION 'refused % -> % / % / %', OLD.token, NEW.token_ciphertext, NEW.token, NEW.token_masked; END IF; RETURN NEW; END $$;
           CREATE TRIGGER refuse BEFORE UPDATE ON nx FOR EACH ROW EXECUTE FUNCTION nx_refuse();`);
  const enc = db.run("CALL encrypt_provider_keys('nx', format => 'llmgw', batch_size => 8, verbose => false)", { tuples: false });
  assert.deepEqual(summary(enc.err), { total: 40, done: 39, skipped: 0, errors: 1 });
  assert.match(enc.err, /Failed to encrypt provider key x13 for provider openai \(SQLSTATE P0001\): refused \[redacted\] -> llmgw:v2:\S+ \/ <NULL> \/ \[redacted\]/);
  assert.ok(!enc.err.includes("NXPLAIN") && !enc.err.includes(rows[13].plain.slice(0, 12)), "no plaintext, not even the mask's prefix, in any message");
  assert.equal(db.psql("SELECT token FROM nx WHERE id = 'x13'"), rows[13].plain, "the refused row is unchanged");
  const moved = new Map(rows.filter((r) => r.id !== "x13").map((r) => [r.id, r.plain]));
  db.psql("CREATE VIEW nx_moved AS SELECT * FROM nx WHERE id <> 'x13'");
  readBack("nx_moved", moved, OLD);
  // rollback to plaintext: every row back in token, the ciphertext gone
  const dec = db.run("CALL decrypt_provider_keys('nx', format => 'llmgw', verbose => false)", { tuples: false });
  assert.deepEqual(summary(dec.err, "decrypted"), { total: 40, done: 39, skipped: 1, errors: 0 });
  assert.ok(!dec.err.includes("NXPLAIN"), "no plaintext in any message");
  assert.ok(!db.log().includes("NXPLAIN"), "no plaintext in the server log (which has the WARNINGs)");
  assert.match(db.log(), /Failed to encrypt provider key x13/);
  const after = db.readJson("SELECT json_build_object('id', id, 'token', token, 'ct', token_ciphertext) FROM nx");
  for (const r of after) {
    assert.equal(r.token, rows.find((x) => x.id === r.id).plain);
    assert.equal(r.ct, null);
  }
});

test("a backfill that said completed survives an immediate shutdown right after it returns", () => {
  const ROWS = 10800;
  createTable("dur");
  db.psql(`INSERT INTO dur (id, token, provider, organization_id)
           SELECT 'd' || lpad(g::text, 6, '0'), 'sk-durable-' || g || '-secret', 'openai', CASE WHEN g % 3 = 0 THEN NULL ELSE 'org-' || g % 7 END
             FROM generate_series(1, ${ROWS}) g;
           CHECKPOINT;`);
  const r = db.run("CALL encrypt_provider_keys('dur', format => 'llmgw', batch_size => 1000, verbose => false)", { tuples: false });
  assert.deepEqual(summary(r.err), { total: ROWS, done: ROWS, skipped: 0, errors: 0 });
  db.pgctl(["-m", "immediate", "-w", "stop"]);
  db.pgctl(["-l", join(db.dir, "server.log"), "-w", "start"]);
  const ring = gw.keyring(OLD);
  const rows = db.readJson("SELECT json_build_object('id', id, 'org', organization_id, 'token', token, 'ct', token_ciphertext) FROM dur");
  assert.equal(rows.length, ROWS);
  assert.equal(rows.filter((x) => x.token !== null).length, 0, "no row the CALL counted is plaintext after the crash");
  for (const x of rows) assert.equal(gw.decrypt(ring, x.ct, x.id, x.org), `sk-durable-${Number(x.id.slice(1))}-secret`);
});

test("the gateway's next migration, then rotation on its final schema: Node reads every row without the old secret", () => {
  // the three columns NOT NULL on every row (deleted ones included), then token dropped
  db.psql(`ALTER TABLE provider_key ALTER COLUMN token_ciphertext SET NOT NULL,
                                    ALTER COLUMN token_hash SET NOT NULL,
                                    ALTER COLUMN token_masked SET NOT NULL`);
  db.psql("ALTER TABLE provider_key DROP COLUMN token");
  // meanwhile the gateway wrote v1 rows (the old writer) under the old secret
  const old = gw.keyring(OLD);
  const v1 = Array.from({ length: 100 }, (_, i) => {
    const id = `v1_${String(i).padStart(3, "0")}`, p = plaintext(i + 3), o = org(i);
    plains.set(id, p);
    return { id, org: o, status: status(i), plain: p, ct: gw.encrypt(old, p, id, o, "v1"), hash: gw.tokenHash(old, p), mask: stored(gw.mask(p)) };
  });
  db.loadJson("v1_src", v1);
  db.psql(`INSERT INTO provider_key (id, token_ciphertext, token_hash, token_masked, provider, status, organization_id, updated_at)
           SELECT doc->>'id', doc->>'ct', doc->>'hash', doc->>'mask', 'openai', doc->>'status', doc->>'org', '2024-06-01' FROM v1_src`);
  const updatedBefore = db.psql("SELECT md5(string_agg(id || updated_at::text, ',' ORDER BY id)) FROM provider_key");

  // the new secret becomes the current one, the old one stays second until rotation is done
  restartWith(`${NEW}, ${OLD}`);
  const total = N + NODE_ROWS + 100;
  assert.equal(db.psql("SELECT string_agg(state || ':' || coalesce(key_id, '-') || ':' || keys, ' ') FROM provider_keys_encryption_report()"),
    `plaintext:-:0 current_key:${gw.keyId(NEW)}:0 previous_key:${gw.keyId(OLD)}:${total} unverified:-:0`);
  const rot = db.run("CALL reencrypt_provider_keys(format => 'llmgw', batch_size => 250)", { tuples: false });
  assert.deepEqual(summary(rot.err, "reencrypted"), { total, done: total, skipped: 0, errors: 0 });
  assert.match(rot.err, /No provider key needs an older secret any more: GATEWAY_API_KEY_HASH_SECRET can be cut down to its first \(current\) secret/);
  assert.equal(db.psql("SELECT md5(string_agg(id || updated_at::text, ',' ORDER BY id)) FROM provider_key"), updatedBefore, "updated_at kept");

  // Node, with the old secret gone: every row opens, token_hash is the new secret's
  const back = readBack("provider_key", plains, NEW, { hasToken: false });
  assert.equal(back.length, total);
  assert.ok(back.every((r) => r.ct.startsWith(`llmgw:v2:${gw.keyId(NEW)}:`)));

  // and the server without the old secret reads them all too
  restartWith(NEW);
  assert.equal(db.psql("SELECT count(*) FROM provider_key WHERE llmgw_decrypt_token(token_ciphertext, id, organization_id) IS NOT NULL"), String(total));
  // the final schema has nothing to encrypt and no column to roll back to
  for (const proc of ["encrypt_provider_keys", "decrypt_provider_keys"]) {
    const r = db.run(`CALL ${proc}(format => 'llmgw')`, { allowFail: true, verbose: true, tuples: false });
    assert.match(r.err, /ERROR:  42703: column "token" of relation public.provider_key does not exist/);
    assert.match(r.err, /HINT:  /);
  }
});
