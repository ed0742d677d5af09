// Interop with the gateway's Node.js token code (tests/interop/gateway.mjs, node:crypto only):
// tokens the gateway writes decrypt in the database, and tokens the database writes decrypt
// in Node — 1,200 random plaintexts each way, including empty, multi-byte UTF-8 and 10 KB values.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomBytes, randomInt } from "node:crypto";
import { Cluster, TEST_KEY } from "./cluster.mjs";
import { encrypt, decrypt, fingerprint } from "../interop/gateway.mjs";

const key = Buffer.from(TEST_KEY, "base64");
const db = new Cluster("interop", { port: 54411, env: { ENCRYPTION_KEY: TEST_KEY } });
before(() => db.start());
after(() => db.stop());

function randomText(i) {
  switch (i % 6) {
    case 0: return i === 0 ? "" : "sk-proj-" + randomBytes(randomInt(12, 60)).toString("base64url");
    case 1: return randomBytes(32).toString("hex"); // 64 hex chars: token-shaped plaintext
    case 2: { // random code points from the whole Unicode range (no NUL, no surrogates)
      let s = "";
      for (let n = randomInt(1, 40); n > 0; n--) {
        let cp;
        do cp = randomInt(1, 0x110000); while (cp >= 0xd800 && cp <= 0xdfff);
        s += String.fromCodePoint(cp);
      }
      return s;
    }
    case 3: return "ключ-🔑-" + "é".repeat(randomInt(0, 20)) + "-中文";
    case 4: return i % 60 === 4 ? "x".repeat(10_240) : randomBytes(randomInt(1, 80)).toString("base64");
    default: return `tab\there "quotes" 'single' \\backslash\\ ,comma\nnewline ${i}`;
  }
}

const N = 1200;
const plaintexts = Array.from({ length: N }, (_, i) => randomText(i));

test("the database and Node compute the same key fingerprint", () => {
  assert.equal(db.psql("SELECT provider_keys_encrypt_fingerprint()"), fingerprint(key));
});

test(`${N} tokens written by Node decrypt in the database`, () => {
  db.loadJson("from_node", plaintexts.map((p, i) => ({ i, plain: p, token: encrypt(p, key) })));
  const r = db.psql(`SELECT count(*) FILTER (WHERE decrypt_token(doc->>'token') = doc->>'plain'),
                            count(*) FILTER (WHERE is_encrypted_token(doc->>'token')),
                            count(*) FILTER (WHERE length(doc->>'plain') = 10240),
                            count(*) FILTER (WHERE doc->>'plain' = '')
                       FROM from_node`);
  const [ok, verified, big, empty] = r.split("|").map(Number);
  assert.equal(ok, N, "every gateway token decrypts to its plaintext");
  assert.equal(verified, N);
  assert.ok(big >= 10 && empty === 1, `covers 10 KB (${big}) and empty (${empty}) values`);
});

test(`${N} tokens written by the database decrypt in Node`, () => {
  db.loadJson("to_node", plaintexts.map((p, i) => ({ i, plain: p })));
  const rows = db.readJson(`SELECT json_build_object('i', doc->'i', 'token', encrypt_token(doc->>'plain')) FROM to_node`);
  assert.equal(rows.length, N);
  let ok = 0;
  for (const r of rows) {
    assert.equal(decrypt(r.token, key), plaintexts[r.i]);
    const raw = Buffer.from(r.token, "base64");
    assert.equal(raw.toString("base64"), r.token, "canonical padded standard base64");
    assert.equal(raw.length, 28 + Buffer.byteLength(plaintexts[r.i], "utf8"), "nonce(12) || tag(16) || ciphertext");
    ok++;
  }
  assert.equal(ok, N);
});

test("the migration leaves gateway tokens alone and the gateway reads every result", () => {
  // half the rows already encrypted by the gateway, half plaintext
  const rows = plaintexts.slice(0, 400).map((p, i) => ({ id: `pk_${String(i).padStart(4, "0")}`, plain: p,
    token: i % 2 ? encrypt(p, key) : p, status: ["active", "inactive", "deleted", null][i % 4] }));
  db.loadJson("seed", rows);
  db.psql(`CREATE TABLE provider_key (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
           INSERT INTO provider_key SELECT doc->>'id', doc->>'token', 'openai', doc->>'status' FROM seed`);
  const out = db.run("CALL encrypt_provider_keys(batch_size => 64, verbose => false)", { tuples: false }).err;
  const m = out.match(/total=(\d+), encrypted=(\d+), skipped=(\d+), errors=(\d+)/);
  assert.ok(m, out);
  const deleted = rows.filter((r) => r.status === "deleted").length;
  const plainActive = rows.filter((r, i) => i % 2 === 0 && r.status !== "deleted").length;
  assert.deepEqual(m.slice(1).map(Number), [rows.length - deleted, plainActive, rows.length - deleted - plainActive, 0]);
  const after = db.readJson("SELECT json_build_object('id', id, 'token', token, 'status', status) FROM provider_key");
  const byId = new Map(rows.map((r) => [r.id, r]));
  for (const a of after) {
    const r = byId.get(a.id);
    if (r.status === "deleted") assert.equal(a.token, r.token, "deleted rows are never written");
    else assert.equal(decrypt(a.token, key), r.plain, `gateway decrypts ${a.id}`);
  }
});
