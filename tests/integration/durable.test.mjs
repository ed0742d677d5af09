// A durable finish: when CALL says "completed", everything it counts survives a crash that
// comes right after the CALL returns. Batches commit with synchronous_commit = off (fast), so
// without the engine's final synchronous commit the last batches would live only in the WAL
// buffers; wal_writer_delay = 10s keeps the WAL writer from flushing them for us.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Cluster, TEST_KEY } from "./cluster.mjs";
import { decrypt } from "../interop/gateway.mjs";

const key = Buffer.from(TEST_KEY, "base64");
const db = new Cluster("durable", { port: 54418, env: { ENCRYPTION_KEY: TEST_KEY }, conf: ["wal_writer_delay = 10s"] });
before(() => db.start());
after(() => db.stop());

const ROWS = 10800;

function load(name) {
  db.psql(`CREATE TABLE ${name} (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
           INSERT INTO ${name} SELECT 'r' || lpad(g::text, 6, '0'), 'sk-durable-' || g || '-secret', 'openai' FROM generate_series(1, ${ROWS}) g;
           CHECKPOINT;`);
}

function crashAndRestart() {
  db.pgctl(["-m", "immediate", "-w", "stop"]);
  db.pgctl(["-l", `${db.dir}/server.log`, "-w", "start"]);
}

test("a CALL that said completed survives an immediate shutdown right after it returns", () => {
  load("dur");
  const r = db.run("CALL encrypt_provider_keys('dur', batch_size => 1000, verbose => false)", { tuples: false });
  assert.match(r.err, new RegExp(`completed: total=${ROWS}, encrypted=${ROWS}, skipped=0, errors=0`));
  crashAndRestart();
  const rows = db.readJson("SELECT json_build_object('id', id, 'token', token) FROM dur ORDER BY id");
  assert.equal(rows.length, ROWS);
  let plaintext = 0;
  for (const row of rows) {
    if (row.token.startsWith("sk-durable-")) { plaintext++; continue; }
    assert.equal(decrypt(row.token, key), `sk-durable-${Number(row.id.slice(1))}-secret`);
  }
  assert.equal(plaintext, 0, "no row the CALL counted as encrypted is plaintext after the crash");
});

test("the decrypting rollback is durable too", () => {
  const r = db.run("CALL decrypt_provider_keys('dur', batch_size => 1000, verbose => false)", { tuples: false });
  assert.match(r.err, new RegExp(`completed: total=${ROWS}, decrypted=${ROWS}`));
  crashAndRestart();
  assert.equal(db.psql("SELECT count(*) FROM dur WHERE token LIKE 'sk-durable-%'"), String(ROWS));
});
