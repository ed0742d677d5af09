// The guard on the gateway's llmgw rollout layout: while
// `CALL encrypt_provider_keys(format => 'llmgw', guard => true, batch_size => 200)` runs, two
// sessions acting as gateway instances still on old code keep INSERTing and UPDATEing
// plaintext `token`s, and one on the new code writes token NULL with token_ciphertext,
// token_hash and token_masked. When they stop: no row has a token, every write committed,
// the gateway's Node reference (tests/interop/llmgw_gateway.mjs, node:crypto) opens every
// row's token_ciphertext for its own id and organization to exactly the plaintext last
// written to that row, token_hash and token_masked are the gateway's; then the gateway's next
// migration (the three columns NOT NULL, column token dropped) succeeds once the guard is
// dropped (the trigger depends on column token, so the migration alone is refused first).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Cluster, sleep } from "./cluster.mjs";
import * as gw from "../interop/llmgw_gateway.mjs";

const SECRET = "integration-guard-llmgw-secret";
const db = new Cluster("guard_llmgw", { port: 54446, env: { GATEWAY_API_KEY_HASH_SECRET: SECRET } });
before(() => db.start());
after(() => db.stop());

const N = 20_000;
const OLD_WRITERS = 2;   // writers 0 and 1: old code (plaintext token)
const NEW_WRITER = 2;    // writer 2: new code (token NULL, the three columns)
const WRITERS = 3;

const summary = (stderr) => {
  const m = stderr.match(/completed: total=(\d+), encrypted=(\d+), skipped=(\d+), errors=(\d+)(.*)/);
  assert.ok(m, stderr.slice(-2000));
  return { total: +m[1], encrypted: +m[2], skipped: +m[3], errors: +m[4], line: m[0] };
};

// What the database stores for a mask (a cut surrogate pair becomes U+FFFD on the way in).
const stored = (s) => Buffer.from(s, "utf8").toString("utf8");

// One gateway instance: until told to stop, inserts new keys and updates keys it owns (ids
// ≡ w mod 3, so no two writers touch one row), committing each write and logging it (with
// the plaintext it wrote) in the same transaction, so the log holds exactly what committed.
// Old code writes the plaintext into token; new code writes token NULL and seals the key
// itself, as the gateway does. Some inserted keys have no organization (the managed scope),
// some are soft-deleted: the guard moves them all.
function writer(w) {
  const newCode = w === NEW_WRITER;
  const write = (verb) => newCode
    ? (verb === "insert"
        ? `INSERT INTO provider_key (id, token, token_ciphertext, token_hash, token_masked, provider, status, organization_id)
           VALUES (target, NULL, llmgw_encrypt_token(val, target, org), llmgw_token_hash(val), llmgw_mask_token(val), 'openai', st, org);`
        : `UPDATE provider_key SET token = NULL, token_ciphertext = llmgw_encrypt_token(val, id, organization_id),
                  token_hash = llmgw_token_hash(val), token_masked = llmgw_mask_token(val), updated_at = now()
            WHERE id = target;`)
    : (verb === "insert"
        ? `INSERT INTO provider_key (id, token, provider, status, organization_id) VALUES (target, val, 'openai', st, org);`
        : `UPDATE provider_key SET token = val, updated_at = now() WHERE id = target;`);
  return db.background(`DO $w$
    DECLARE
        n bigint := 0;
        op text; target text; val text; org text; st text;
    BEGIN
        LOOP
            EXIT WHEN (SELECT c.stop FROM writer_control c);
            n := n + 1;
            val := CASE WHEN n % 5 = 0 THEN 'ключ-${w}-' || n || '-🔑-' || md5(random()::text)
                        ELSE 'sk-gw${w}-' || n || '-' || md5(random()::text) END;
            org := CASE WHEN n % 4 = 0 THEN NULL ELSE 'org-' || (n % 7) END;
            st := CASE WHEN n % 6 = 0 THEN 'deleted' ELSE 'active' END;
            IF n % 10 < 3 THEN
                op := 'insert'; target := 'gw${w}-' || n;
            ELSE
                op := 'update'; target := 'pk' || lpad((3 * floor(random() * ${Math.floor(N / 3)})::int + ${w})::text, 6, '0');
            END IF;
            BEGIN
                IF op = 'insert' THEN ${write("insert")}
                ELSE ${write("update")}
                END IF;
                INSERT INTO writer_log (writer, op, id, value, outcome)
                VALUES (${w}, op, target, val, CASE WHEN FOUND THEN 'ok' ELSE 'none' END);
            EXCEPTION WHEN OTHERS THEN
                INSERT INTO writer_log (writer, op, id, value, outcome, message) VALUES (${w}, op, target, val, SQLSTATE, SQLERRM);
            END;
            COMMIT;
            PERFORM pg_sleep(0.002);
        END LOOP;
    END $w$`, { appName: newCode ? "new_gateway" : `old_gateway_${w}` });
}

async function untilEachWriterLogged(atLeast) {
  for (;;) {
    const counts = db.psql(`SELECT string_agg(n::text, ',' ORDER BY writer) FROM
      (SELECT w AS writer, (SELECT count(*) FROM writer_log l WHERE l.writer = w AND l.outcome = 'ok') AS n
         FROM generate_series(0, ${WRITERS - 1}) w) x`).split(",").map(Number);
    if (counts.every((c) => c >= atLeast)) return counts;
    await sleep(100);
  }
}

test("llmgw rollout: the backfill with guard => true ends with no token while old and new gateway instances keep writing", { timeout: 600_000 }, async () => {
  db.script(`
    CREATE TABLE provider_key (
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
        CONSTRAINT provider_key_token_xor CHECK ((token IS NULL) <> (token_ciphertext IS NULL)));
    INSERT INTO provider_key (id, token, provider, status, organization_id)
    SELECT 'pk' || lpad(g::text, 6, '0'), 'sk-orig-' || g || '-' || md5(g::text),
           (ARRAY['openai', 'anthropic', 'google-vertex'])[1 + g % 3],
           CASE WHEN g % 20 = 7 THEN 'deleted' WHEN g % 10 = 3 THEN 'inactive' ELSE 'active' END,
           CASE WHEN g % 5 = 0 THEN NULL ELSE 'org-' || (g % 11) END
      FROM generate_series(1, ${N}) g;
    CREATE TABLE orig AS SELECT id, token FROM provider_key;
    CREATE TABLE writer_log (seq bigserial PRIMARY KEY, writer int, op text, id text, value text, outcome text,
                             message text, at timestamptz NOT NULL DEFAULT clock_timestamp());
    CREATE INDEX ON writer_log (id, seq);
    CREATE TABLE writer_control (stop boolean NOT NULL);
    INSERT INTO writer_control VALUES (false);
    CREATE TABLE run_window (started timestamptz, ended timestamptz);
    VACUUM ANALYZE provider_key;`);

  const ws = Array.from({ length: WRITERS }, (_, w) => writer(w));
  await untilEachWriterLogged(20);
  db.psql("INSERT INTO run_window (started) VALUES (clock_timestamp())");
  const run = await db.background("CALL encrypt_provider_keys(format => 'llmgw', guard => true, batch_size => 200, verbose => false)").done;
  db.psql("UPDATE run_window SET ended = clock_timestamp()");
  assert.equal(run.status, 0, run.err.slice(-2000));
  const atEnd = (await untilEachWriterLogged(0)).reduce((a, b) => a + b, 0);
  await untilEachWriterLogged(Math.ceil(atEnd / WRITERS) + 20);  // and they go on after it
  db.psql("UPDATE writer_control SET stop = true");
  for (const r of await Promise.all(ws.map((w) => w.done))) assert.equal(r.status, 0, r.err.slice(-2000));

  assert.match(run.err, /Installed the guard on public\.provider_key/);
  assert.equal(db.psql("SELECT format || ' ' || mode || ' ' || unverified || ' ' || covers_writes FROM provider_keys_guard_status('provider_key')"),
    "llmgw encrypt keep true");
  const s = summary(run.err);
  console.log(`# ${s.line}`);
  assert.equal(s.errors, 0);
  assert.equal(s.total, s.encrypted + s.skipped + s.errors);

  // every writer wrote during the run, and no write failed (the XOR check included)
  const during = db.readJson(`SELECT json_build_object('writer', l.writer, 'op', l.op, 'n', count(*))
      FROM writer_log l, run_window r WHERE l.outcome = 'ok' AND l.at BETWEEN r.started AND r.ended
     GROUP BY l.writer, l.op`);
  for (let w = 0; w < WRITERS; w++) {
    for (const op of ["insert", "update"]) {
      const n = during.find((d) => d.writer === w && d.op === op)?.n ?? 0;
      assert.ok(n > 0, `writer ${w} did ${op}s during the run (${JSON.stringify(during)})`);
    }
  }
  assert.equal(db.psql("SELECT count(*) FROM writer_log WHERE outcome NOT IN ('ok', 'none')"), "0",
    db.psql("SELECT string_agg(DISTINCT outcome || ': ' || coalesce(message, ''), '; ') FROM writer_log WHERE outcome NOT IN ('ok', 'none')"));

  // no row has a token any more
  assert.equal(db.psql("SELECT count(*) FROM provider_key WHERE token IS NOT NULL"), "0");

  // Node opens every row to the plaintext last written to it (or, never written, its original)
  const ring = gw.keyring(SECRET);
  const rows = db.readJson(`
    SELECT json_build_object('id', p.id, 'org', p.organization_id, 'status', p.status, 'ct', p.token_ciphertext,
                             'hash', p.token_hash, 'mask', p.token_masked, 'expect', COALESCE(l.value, o.token),
                             'by', l.writer)
      FROM provider_key p
      LEFT JOIN orig o ON o.id = p.id
      LEFT JOIN LATERAL (SELECT w.value, w.writer FROM writer_log w WHERE w.id = p.id AND w.outcome = 'ok'
                          ORDER BY w.seq DESC LIMIT 1) l ON true`);
  const inserted = Number(db.psql("SELECT count(*) FROM writer_log WHERE op = 'insert'"));
  assert.equal(rows.length, N + inserted, "every insert is there, no row appeared or vanished");
  let byOld = 0, byNew = 0, managed = 0, deleted = 0;
  for (const r of rows) {
    assert.ok(r.expect, `row ${r.id} has a known plaintext`);
    assert.equal(gw.decrypt(ring, r.ct, r.id, r.org), r.expect, `row ${r.id}: Node opens its token_ciphertext to the last value written`);
    assert.equal(r.hash, gw.tokenHash(ring, r.expect), `row ${r.id}: token_hash`);
    assert.equal(r.mask, stored(gw.mask(r.expect)), `row ${r.id}: token_masked`);
    if (r.by === NEW_WRITER) byNew++; else if (r.by !== null) byOld++;
    if (r.org === null) managed++;
    if (r.status === "deleted") deleted++;
  }
  assert.ok(byOld > 0 && byNew > 0 && managed > 0 && deleted > 0, JSON.stringify({ byOld, byNew, managed, deleted }));
  console.log(`# Node opened ${rows.length} rows: ${byOld} last written in plaintext by old instances, ${byNew} by the new code, ${managed} managed, ${deleted} soft-deleted`);

  // the gateway's next migration: the trigger depends on column token, so drop the guard first
  const refused = db.run("ALTER TABLE provider_key DROP COLUMN token", { allowFail: true });
  assert.notEqual(refused.status, 0);
  assert.match(refused.err, /trigger provider_keys_encrypt_guard on table provider_key depends on column token/);
  db.script(`DROP TRIGGER provider_keys_encrypt_guard ON provider_key;
    ALTER TABLE provider_key ALTER COLUMN token_ciphertext SET NOT NULL,
                             ALTER COLUMN token_hash SET NOT NULL,
                             ALTER COLUMN token_masked SET NOT NULL;
    ALTER TABLE provider_key DROP COLUMN token;`);
  assert.equal(db.psql("SELECT count(*) FROM provider_key WHERE token_ciphertext IS NULL OR token_hash IS NULL OR token_masked IS NULL"), "0");
  assert.equal(db.psql("SELECT count(*) FROM pg_attribute WHERE attrelid = 'provider_key'::regclass AND attname = 'token'"), "0");
});
