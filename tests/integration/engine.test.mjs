// The table engine against a real server, with real concurrent sessions: no lost update,
// commits per batch, a cancelled or killed run keeps its progress and a re-run finishes,
// and no plaintext or key in the server log or pg_stat_activity.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Cluster, TEST_KEY, sleep } from "./cluster.mjs";
import { decrypt } from "../interop/gateway.mjs";

const key = Buffer.from(TEST_KEY, "base64");
const db = new Cluster("engine", { port: 54412, env: { ENCRYPTION_KEY: TEST_KEY } });
before(() => db.start());
after(() => db.stop());

function makeTable(name, n, plain = (i) => `sk-${name}-${String(i).padStart(6, "0")}-secret`) {
  db.psql(`CREATE TABLE ${name} (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active')`);
  db.loadJson(`${name}_src`, Array.from({ length: n }, (_, i) => ({ id: `r${String(i).padStart(6, "0")}`, token: plain(i) })));
  db.psql(`INSERT INTO ${name} SELECT doc->>'id', doc->>'token', 'openai' FROM ${name}_src;
           CREATE TABLE ${name}_orig AS SELECT id, token FROM ${name}`);
}

// Every row holds its original plaintext or a token of it (nothing lost or corrupted).
function checkIntact(name) {
  const rows = db.readJson(`SELECT json_build_object('id', t.id, 'token', t.token, 'orig', o.token)
                              FROM ${name} t JOIN ${name}_orig o USING (id)`);
  let encrypted = 0;
  for (const r of rows) {
    if (r.token === r.orig) continue;
    assert.equal(decrypt(r.token, key), r.orig, `row ${r.id} is a token of its original`);
    encrypted++;
  }
  return { rows: rows.length, encrypted };
}

const summary = (stderr) => {
  const m = stderr.match(/total=(\d+), encrypted=(\d+), skipped=(\d+), errors=(\d+)/);
  assert.ok(m, stderr);
  return { total: +m[1], encrypted: +m[2], skipped: +m[3], errors: +m[4], text: m[0] };
};

test("no lost update: rows the application changes mid-run end as the application wrote them", async () => {
  makeTable("lu", 40);
  // The run pauses 2 s on its first write, between reading its batch and writing the rest.
  db.psql(`CREATE FUNCTION lu_pause() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.id = 'r000000' AND current_user = 'postgres' THEN PERFORM pg_sleep(2); END IF; RETURN NEW; END $$;
           CREATE TRIGGER pause BEFORE UPDATE ON lu FOR EACH ROW EXECUTE FUNCTION lu_pause();
           CREATE ROLE app LOGIN; GRANT SELECT, UPDATE ON lu TO app;`);
  const run = db.background("CALL encrypt_provider_keys('lu', batch_size => 100, verbose => false)");
  await sleep(700);
  // while the run is paused: a new plaintext (committed), a soft delete, and a locked row
  db.psql("UPDATE lu SET token = 'sk-app-new-value-10' WHERE id = 'r000010'", { user: "app" });
  db.psql("UPDATE lu SET status = 'deleted' WHERE id = 'r000011'", { user: "app" });
  const locker = db.background("BEGIN; UPDATE lu SET token = 'sk-app-locked-12' WHERE id = 'r000012'; SELECT pg_sleep(2.5); COMMIT;", { user: "app" });
  await sleep(300);
  const activity = db.psql("SELECT string_agg(query, ' || ') FROM pg_stat_activity WHERE datname = 'postgres'");
  assert.ok(!/secret|sk-app/.test(activity.replace(/sk-app-locked-12/g, "")), `pg_stat_activity shows no token of the run: ${activity}`);
  const [r, l] = await Promise.all([run.done, locker.done]);
  assert.equal(r.status, 0, r.err);
  assert.equal(l.status, 0, l.err);
  const s = summary(r.err);
  // r000010 and r000012 got new plaintext after the run's snapshot: PostgreSQL re-checks them
  // and the run encrypts the application's new values; r000011 was soft-deleted meanwhile:
  // not written (the one row counted as changed concurrently)
  assert.match(r.err, /total=40, encrypted=39, skipped=1, errors=0, changed_concurrently=1/, r.err);
  const rows = Object.fromEntries(db.readJson("SELECT json_build_object('id', id, 'token', token, 'status', status) FROM lu").map((x) => [x.id, x]));
  assert.equal(decrypt(rows.r000010.token, key), "sk-app-new-value-10", "the application's new value was encrypted, not overwritten");
  assert.equal(rows.r000011.token, "sk-lu-000011-secret", "the row soft-deleted mid-run was not written");
  // the locked row: written by the app after the run passed or re-examined; either way the app's value
  const t12 = rows.r000012.token;
  assert.equal(t12 === "sk-app-locked-12" ? t12 : decrypt(t12, key), "sk-app-locked-12");
  assert.equal(s.errors, 0);
  // a second run leaves no plaintext
  const again = summary(db.run("CALL encrypt_provider_keys('lu', verbose => false)", { tuples: false }).err);
  assert.equal(again.errors, 0);
  assert.equal(db.psql("SELECT count(*) FROM lu WHERE status IS DISTINCT FROM 'deleted' AND NOT is_encrypted_token(token)"), "0");
});

// A run slowed to about 1 ms per row (so it can be interrupted mid-way), in the background.
function startSlowRun(name, appName) {
  makeTable(name, 3000);
  db.psql(`CREATE FUNCTION ${name}_slow() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN PERFORM pg_sleep(0.001); RETURN NEW; END $$;
           CREATE TRIGGER slow BEFORE UPDATE ON ${name} FOR EACH ROW EXECUTE FUNCTION ${name}_slow();`);
  return db.background(`CALL encrypt_provider_keys('${name}', batch_size => 100, verbose => false)`, { appName });
}

test("a cancelled run keeps its committed batches; a re-run finishes the job", async () => {
  const run = startSlowRun("cx", "pke_cancel");
  await sleep(1500);
  // meanwhile another session already sees committed progress
  const seen = Number(db.psql("SELECT count(*) FROM cx WHERE is_encrypted_token(token)"));
  assert.ok(seen > 0, "batches are committed as the run goes");
  db.psql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'pke_cancel'");
  const r = await run.done;
  assert.notEqual(r.status, 0);
  assert.match(r.err, /canceling statement due to user request/);
  const mid = checkIntact("cx");
  assert.ok(mid.encrypted > 0 && mid.encrypted < 3000, `progress kept: ${mid.encrypted}`);
  db.psql("DROP TRIGGER slow ON cx");
  const s = summary(db.run("CALL encrypt_provider_keys('cx', verbose => false)", { tuples: false }).err);
  assert.equal(s.encrypted, 3000 - mid.encrypted, "the re-run does exactly what is left");
  assert.equal(checkIntact("cx").encrypted, 3000);
});

test("kill -9 of the backend mid-run: after crash recovery nothing is lost, a re-run finishes", async () => {
  const run = startSlowRun("kx", "pke_kill");
  await sleep(1500);
  const pid = Number(db.psql("SELECT pid FROM pg_stat_activity WHERE application_name = 'pke_kill'"));
  assert.ok(pid > 0);
  process.kill(pid, "SIGKILL");
  await run.done;
  // the postmaster reinitialises; wait until it accepts connections again
  for (let i = 0; i < 100; i++) {
    if (db.run("SELECT 1", { allowFail: true }).status === 0) break;
    await sleep(200);
  }
  const mid = checkIntact("kx");
  assert.equal(mid.rows, 3000, "no row lost");
  assert.ok(mid.encrypted > 0, `committed batches survived the crash: ${mid.encrypted}`);
  db.psql("DROP TRIGGER slow ON kx");
  summary(db.run("CALL encrypt_provider_keys('kx', verbose => false)", { tuples: false }).err);
  assert.equal(checkIntact("kx").encrypted, 3000, "0 plaintext rows left");
});

test("the server log never carries a key or a plaintext (log_statement = all, debug1)", () => {
  makeTable("lg", 50, (i) => `sk-logcheck-${i}-PLAINTEXT`);
  db.psql(`CREATE FUNCTION lg_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.id = 'r000007' THEN RAISE EXCEPTION 'refused % -> %', OLD.token, NEW.token; END IF; RETURN NEW; END $$;
           CREATE TRIGGER refuse BEFORE UPDATE ON lg FOR EACH ROW EXECUTE FUNCTION lg_refuse();`);
  for (const s of ["log_statement = 'all'", "log_min_messages = 'debug1'", "log_min_error_statement = 'debug1'"]) {
    db.psql(`ALTER SYSTEM SET ${s}`);
  }
  db.reload();
  const mark = db.log().length;
  const enc = db.run("CALL encrypt_provider_keys('lg', batch_size => 8)", { tuples: false });
  assert.match(enc.err, /Failed to encrypt provider key r000007 .*\[redacted\]/);
  db.psql("DROP TRIGGER refuse ON lg");
  db.run("CALL encrypt_provider_keys('lg')", { tuples: false });
  db.run("CALL decrypt_provider_keys('lg')", { tuples: false });
  db.run("SELECT decrypt_token('bm90LWEtdG9rZW4tYnV0LWxvbmctZW5vdWdoLXRvLWRlY29kZQ==')", { allowFail: true });
  db.psql("ALTER SYSTEM RESET ALL");
  db.reload();
  const log = db.log().slice(mark);
  assert.ok(log.includes("CALL encrypt_provider_keys"), "statements were logged");
  assert.ok(!log.includes("PLAINTEXT"), "no plaintext in the server log");
  assert.ok(!log.includes(TEST_KEY) && !log.includes(TEST_KEY.slice(0, 20)), "no key in the server log");
});
