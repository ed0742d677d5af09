// The guard in a rollout: 200,000 keys, three sessions acting as gateway instances still on old
// code (plaintext inserts, plaintext updates, soft deletes, all the time), and
// `CALL encrypt_provider_keys(guard => true)` in the middle of it. When the writers stop: no
// plaintext left, no update lost, the summary adds up, and real Node decrypts every token. Then
// the same writers against mode=reject: every plaintext write fails cleanly with 23000 and
// nothing else changes. And a pg_dump / pg_restore keeps the guard working.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { Cluster, TEST_KEY, sleep } from "./cluster.mjs";
import { decrypt } from "../interop/gateway.mjs";

const key = Buffer.from(TEST_KEY, "base64");
const db = new Cluster("guard", { port: 54440, env: { ENCRYPTION_KEY: TEST_KEY } });
before(() => db.start());
after(() => db.stop());

const N = 200_000;
const WRITERS = 3;
const PG_BIN = process.env.PKE_PG_BIN;

const summary = (stderr) => {
  const m = stderr.match(/completed: total=(\d+), encrypted=(\d+), skipped=(\d+), errors=(\d+)(.*)/);
  assert.ok(m, stderr.slice(-2000));
  const extra = (name) => Number((m[5].match(new RegExp(`${name}=(\\d+)`)) ?? [0, 0])[1]);
  return { total: +m[1], encrypted: +m[2], skipped: +m[3], errors: +m[4],
           unverified: extra("unverified"), changed: extra("changed_concurrently"), line: m[0] };
};

// One old gateway instance: a session that, until told to stop, inserts new plaintext keys,
// updates keys it owns (ids ≡ w+1 mod 3, so no two writers touch one row) to new plaintext
// values, and soft-deletes some (it leaves deleted keys alone), committing each write. Every write and its outcome (ok, or
// the SQLSTATE it failed with) is logged in the same transaction as the write itself, so the
// log holds exactly what committed. One value in 7 is 64 hex characters: token-shaped
// plaintext, which no key opens.
function writer(w, phase) {
  return db.background(`DO $w$
    DECLARE
        n bigint := 0;
        op text; target text; val text;
    BEGIN
        LOOP
            EXIT WHEN (SELECT c.stop FROM writer_control c);
            n := n + 1;
            val := CASE WHEN n % 7 = 0 THEN md5(random()::text) || md5(random()::text)
                        ELSE 'sk-gw${w}-p${phase}-' || n || '-' || md5(random()::text) END;
            target := 'pk' || lpad((3 * floor(random() * ${Math.floor(N / 3)})::int + ${w + 1})::text, 6, '0');
            CASE
                WHEN n % 10 < 4 THEN op := 'insert'; target := 'gw${w}-p${phase}-' || n;
                WHEN n % 10 < 9 THEN op := 'update';
                ELSE op := 'delete'; val := NULL;
            END CASE;
            BEGIN
                IF op = 'insert' THEN
                    INSERT INTO provider_key (id, token, provider) VALUES (target, val, 'openai');
                ELSIF op = 'update' THEN
                    UPDATE provider_key SET token = val, updated_at = now() WHERE id = target AND status IS DISTINCT FROM 'deleted';
                ELSE
                    UPDATE provider_key SET status = 'deleted', updated_at = now() WHERE id = target AND status IS DISTINCT FROM 'deleted';
                END IF;
                INSERT INTO writer_log (phase, writer, op, id, value, outcome)
                VALUES (${phase}, ${w}, op, target, val, CASE WHEN FOUND THEN 'ok' ELSE 'none' END);
            EXCEPTION WHEN OTHERS THEN
                INSERT INTO writer_log (phase, writer, op, id, value, outcome, message) VALUES (${phase}, ${w}, op, target, val, SQLSTATE, SQLERRM);
            END;
            COMMIT;
            PERFORM pg_sleep(0.002);
        END LOOP;
    END $w$`, { appName: `old_gateway_${w}` });
}

async function untilEachWriterLogged(phase, atLeast) {
  for (;;) {
    const counts = db.psql(`SELECT string_agg(n::text, ',' ORDER BY writer) FROM
      (SELECT w AS writer, (SELECT count(*) FROM writer_log l WHERE l.phase = ${phase} AND l.writer = w) AS n
         FROM generate_series(0, ${WRITERS - 1}) w) x`).split(",").map(Number);
    if (counts.every((c) => c >= atLeast)) return counts;
    await sleep(100);
  }
}

async function stopWriters(ws) {
  db.psql("UPDATE writer_control SET stop = true");
  for (const r of await Promise.all(ws.map((w) => w.done))) assert.equal(r.status, 0, r.err.slice(-2000));
}

test("rollout: the run ends at 0 plaintext while old gateway instances keep writing plaintext", { timeout: 600_000 }, async () => {
  db.script(`
    CREATE TABLE provider_key (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active',
                               created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
                               base_url text, organization_id text);
    INSERT INTO provider_key (id, token, provider, status)
    SELECT 'pk' || lpad(g::text, 6, '0'),
           CASE WHEN g % 50 = 0 THEN md5(g::text) || md5((g + 1)::text) ELSE 'sk-orig-' || g || '-' || md5(g::text) END,
           (ARRAY['openai', 'anthropic', 'google-vertex'])[1 + g % 3],
           CASE WHEN g % 20 = 7 THEN 'deleted' WHEN g % 10 = 3 THEN 'inactive' ELSE 'active' END
      FROM generate_series(1, ${N}) g;
    CREATE TABLE orig AS SELECT id, token, status FROM provider_key;
    CREATE TABLE writer_log (seq bigserial PRIMARY KEY, phase int, writer int, op text, id text, value text, outcome text,
                             message text, at timestamptz NOT NULL DEFAULT clock_timestamp());
    CREATE INDEX ON writer_log (id, seq);
    CREATE TABLE writer_control (stop boolean NOT NULL);
    INSERT INTO writer_control VALUES (false);
    CREATE TABLE run_window (started timestamptz, ended timestamptz);
    VACUUM ANALYZE provider_key;`);
  const activeAtStart = Number(db.psql("SELECT count(*) FROM provider_key WHERE status IS DISTINCT FROM 'deleted'"));

  // phase 1: the guard installed by the run, while the old instances write
  const ws = Array.from({ length: WRITERS }, (_, w) => writer(w, 1));
  await untilEachWriterLogged(1, 30);
  db.psql("INSERT INTO run_window (started) VALUES (clock_timestamp())");
  // (in the background: the event loop keeps draining the writers' output meanwhile)
  const run = await db.background("CALL encrypt_provider_keys(guard => true, verbose => false)").done;
  db.psql("UPDATE run_window SET ended = clock_timestamp()");
  assert.equal(run.status, 0, run.err.slice(-2000));
  const before = (await untilEachWriterLogged(1, 0)).reduce((a, b) => a + b, 0);
  await untilEachWriterLogged(1, Math.ceil(before / WRITERS) + 30);  // and they go on after it
  await stopWriters(ws);

  assert.match(run.err, /Installed the guard on public\.provider_key/);
  const s = summary(run.err);
  console.log(`# ${s.line}`);

  // the writers wrote all through the run: plaintext inserts and updates, soft deletes
  const during = db.readJson(`SELECT json_build_object('writer', l.writer, 'op', l.op, 'n', count(*))
      FROM writer_log l, run_window r WHERE l.phase = 1 AND l.outcome = 'ok' AND l.at BETWEEN r.started AND r.ended
     GROUP BY l.writer, l.op`);
  for (let w = 0; w < WRITERS; w++) {
    for (const op of ["insert", "update", "delete"]) {
      const n = during.find((d) => d.writer === w && d.op === op)?.n ?? 0;
      assert.ok(n > 0, `writer ${w} did ${op}s during the run (${JSON.stringify(during)})`);
    }
  }
  assert.equal(db.psql("SELECT count(*) FROM writer_log WHERE phase = 1 AND outcome NOT IN ('ok', 'none')"), "0", "no write of the old instances failed");
  const gaps = db.psql(`SELECT round(max(gap) * 1000) FROM (SELECT extract(epoch FROM at - lag(at) OVER (PARTITION BY writer ORDER BY seq)) AS gap
                          FROM writer_log WHERE phase = 1) g`);
  const writes = db.psql("SELECT count(*) FROM writer_log WHERE phase = 1");
  console.log(`# ${writes} writes by ${WRITERS} old instances; the longest a writer waited between two writes: ${gaps} ms`);

  // 0 plaintext among rows not deleted: every one authenticates under the current key
  assert.equal(db.psql(`SELECT count(*) FROM provider_key WHERE status IS DISTINCT FROM 'deleted'
                          AND pke_internal.token_state(token) <> 'current_key'`), "0");
  assert.deepEqual(db.psql("SELECT state || '=' || keys FROM provider_keys_encryption_report() WHERE state IN ('plaintext', 'unverified', 'previous_key') ORDER BY state").split("\n"),
    ["plaintext=0", "previous_key=0", "unverified=0"]);

  // 0 lost updates: every row holds the last value its writer wrote (or, never written, its
  // original); real Node decrypts every token that is not a deleted row's plaintext
  const rows = db.readJson(`
    SELECT json_build_object('id', p.id, 'token', p.token, 'status', p.status,
                             'expect', COALESCE(l.value, o.token), 'written', l.value IS NOT NULL)
      FROM provider_key p
      LEFT JOIN orig o ON o.id = p.id
      LEFT JOIN LATERAL (SELECT w.value FROM writer_log w
                          WHERE w.id = p.id AND w.op IN ('insert', 'update') AND w.outcome = 'ok'
                          ORDER BY w.seq DESC LIMIT 1) l ON true`);
  let decrypted = 0, deletedAsGiven = 0, written = 0;
  for (const r of rows) {
    if (r.written) written++;
    if (r.status === "deleted" && r.token === r.expect) { deletedAsGiven++; continue; }
    assert.equal(decrypt(r.token, key), r.expect, `row ${r.id} holds the last value written to it`);
    decrypted++;
  }
  const inserted = Number(db.psql("SELECT count(*) FROM writer_log WHERE phase = 1 AND op = 'insert'"));
  assert.equal(rows.length, N + inserted, "every insert is there, no row appeared or vanished");
  console.log(`# Node decrypted ${decrypted} tokens; ${written} rows hold a value an old instance wrote; ${deletedAsGiven} deleted rows kept their plaintext as written`);

  // the summary adds up, and accounts for every row the run had to encrypt
  assert.equal(s.total, s.encrypted + s.skipped + s.errors);
  assert.equal(s.errors, 0);
  const untouched = Number(db.psql(`SELECT count(*) FROM orig o WHERE o.status IS DISTINCT FROM 'deleted'
                                       AND NOT EXISTS (SELECT 1 FROM writer_log w WHERE w.id = o.id)`));
  assert.ok(s.encrypted >= untouched, `the run encrypted every row no writer touched (${s.encrypted} >= ${untouched})`);
  assert.ok(s.encrypted <= activeAtStart + inserted, `${s.encrypted} <= ${activeAtStart} + ${inserted}`);
  assert.ok(s.total >= untouched && s.total <= activeAtStart + inserted);
  const untouchedHex = Number(db.psql(`SELECT count(*) FROM orig o WHERE o.status IS DISTINCT FROM 'deleted' AND length(o.token) = 64
                                         AND NOT EXISTS (SELECT 1 FROM writer_log w WHERE w.id = o.id)`));
  assert.ok(untouchedHex > 0 && s.unverified >= untouchedHex, `unverified rows are counted (${s.unverified} >= ${untouchedHex})`);

  // phase 2: the guard switched to mode=reject; the same writers, and the run once more
  db.script(`BEGIN;
    DROP TRIGGER provider_keys_encrypt_guard ON provider_key;
    CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token, status ON provider_key
        FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard('mode=reject');
    COMMIT;
    UPDATE writer_control SET stop = false;
    CREATE TABLE snapshot AS SELECT * FROM provider_key;`);
  assert.equal(db.psql("SELECT mode FROM provider_keys_guard_status('provider_key')"), "reject");
  const ws2 = Array.from({ length: WRITERS }, (_, w) => writer(w, 2));
  await untilEachWriterLogged(2, 30);
  const run2 = await db.background("CALL encrypt_provider_keys(guard => true, verbose => false)").done;
  assert.equal(run2.status, 0, run2.err.slice(-2000));
  await untilEachWriterLogged(2, 60);
  await stopWriters(ws2);
  assert.match(run2.err, /The guard is already installed on public\.provider_key: trigger provider_keys_encrypt_guard \(mode=reject/);
  const s2 = summary(run2.err);
  assert.equal(s2.encrypted, 0);
  assert.equal(s2.errors, 0);

  const outcomes = Object.fromEntries(db.readJson(`SELECT json_build_object('k', op || ':' || outcome, 'n', count(*))
      FROM writer_log WHERE phase = 2 GROUP BY op, outcome`).map((x) => [x.k, x.n]));
  console.log(`# mode=reject: ${JSON.stringify(outcomes)}`);
  assert.ok(outcomes["insert:23000"] > 0 && outcomes["update:23000"] > 0 && outcomes["delete:ok"] > 0, JSON.stringify(outcomes));
  const unexpected = Object.keys(outcomes).filter((k) => !["delete:ok", "delete:none", "insert:23000", "update:23000", "update:none"].includes(k));
  assert.deepEqual(unexpected, [], "every plaintext write failed with the guard's SQLSTATE, and only those");
  // nothing else changed: the table is the snapshot, but for the soft deletes
  assert.equal(db.psql(`SELECT count(*) FROM (
      SELECT id, token, provider, status, created_at, updated_at FROM provider_key
      EXCEPT SELECT id, token, provider, status, created_at, updated_at FROM snapshot) x
     WHERE NOT EXISTS (SELECT 1 FROM writer_log w WHERE w.phase = 2 AND w.op = 'delete' AND w.id = x.id)`), "0");
  assert.equal(db.psql("SELECT count(*) FROM provider_key"), db.psql("SELECT count(*) FROM snapshot"));
  assert.equal(db.psql(`SELECT count(*) FROM provider_key p JOIN snapshot s USING (id)
                         WHERE p.token <> s.token OR p.provider <> s.provider`), "0");
  // each refusal named its row, never the value
  assert.equal(db.psql(`SELECT count(*) FROM writer_log WHERE phase = 2 AND outcome = '23000'
                          AND (position('refused provider key ' || id || ':' IN message) = 0 OR position(value IN message) > 0)`), "0");
});

// psql against one database of the cluster.
function onDb(dbname, sql, { allowFail = false } = {}) {
  const args = db.args().map((a, i, all) => (all[i - 1] === "-d" ? dbname : a));
  const r = spawnSync(`${PG_BIN}/psql`, [...args, "-At", "-c", sql], { encoding: "utf8" });
  if (r.status !== 0 && !allowFail) throw new Error(`psql failed: ${r.stderr}`);
  return { out: r.stdout.trim(), err: r.stderr, status: r.status };
}

test("pg_dump and pg_restore keep the guard working", () => {
  db.psql("CREATE DATABASE dump_src");
  db.psql("CREATE DATABASE dump_dst");
  for (const sql of [
    "CREATE EXTENSION provider_keys_encrypt",
    `CREATE TABLE provider_key (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active')`,
    `CREATE TABLE strict_keys (LIKE provider_key INCLUDING ALL)`,
    `INSERT INTO provider_key SELECT 'd' || g, 'sk-dump-' || g, 'openai' FROM generate_series(1, 20) g`,
    "CALL encrypt_provider_keys(guard => true, verbose => false)",
    `CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token, status ON strict_keys
       FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard('mode=reject', 'unverified=keep')`,
  ]) onDb("dump_src", sql);

  const file = join(db.dir, "guard.dump");
  for (const [tool, args] of [["pg_dump", ["-Fc", "-f", file, "dump_src"]], ["pg_restore", ["-d", "dump_dst", file]]]) {
    const r = spawnSync(`${PG_BIN}/${tool}`, ["-h", db.dir, "-p", String(db.port), "-U", "postgres", ...args], { encoding: "utf8" });
    assert.equal(r.status, 0, `${tool}: ${r.stderr}`);
  }
  assert.equal(onDb("dump_dst", "SELECT string_agg(relation || ':' || mode || ':' || unverified || ':' || covers_writes, ' ' ORDER BY relation::text) FROM provider_keys_guard_status()").out,
    "provider_key:encrypt:plaintext:true strict_keys:reject:keep:true");
  // the restored guard encrypts a plaintext write; Node decrypts it and the restored tokens
  onDb("dump_dst", "INSERT INTO provider_key VALUES ('d21', 'sk-after-restore', 'openai')");
  onDb("dump_dst", "UPDATE provider_key SET token = 'sk-after-restore-1' WHERE id = 'd1'");
  const rows = JSON.parse(onDb("dump_dst", "SELECT json_agg(json_build_object('id', id, 'token', token)) FROM provider_key").out);
  assert.equal(rows.length, 21);
  for (const r of rows) {
    const want = r.id === "d21" ? "sk-after-restore" : r.id === "d1" ? "sk-after-restore-1" : `sk-dump-${r.id.slice(1)}`;
    assert.equal(decrypt(r.token, key), want, r.id);
  }
  // and the restored reject guard refuses one
  const refused = onDb("dump_dst", "INSERT INTO strict_keys VALUES ('s1', 'sk-refused', 'openai')", { allowFail: true });
  assert.notEqual(refused.status, 0);
  assert.match(refused.err, /the guard on table "strict_keys" refused provider key s1/);
  assert.equal(onDb("dump_dst", "SELECT count(*) FROM strict_keys").out, "0");
  // decrypting the restored table still refuses while its guard is there
  const d = onDb("dump_dst", "CALL decrypt_provider_keys()", { allowFail: true });
  assert.match(d.err, /has the guard installed/);
});
