// Keys from provider_keys_encrypt.key_command, and rotation by reload (never a restart) while
// an application keeps writing and reading, for both formats. The command here reads a file
// only the server's OS user can read; the recipes for secret managers (docs/configuration.md)
// print the same lines. Also: a command that fails, prints garbage or hangs after a reload
// keeps the keys fetched before and logs why, never a byte of its output; one that fails at
// start leaves the functions refusing with its SQLSTATE; the command wins over the
// environment and says so; what other roles can see of it.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { writeFileSync, readFileSync, readdirSync, existsSync, chownSync, chmodSync } from "node:fs";
import { join } from "node:path";
import { execFileSync } from "node:child_process";
import { Cluster, sleep } from "./cluster.mjs";
import * as b64 from "../interop/gateway.mjs";
import * as gw from "../interop/llmgw_gateway.mjs";

const isRoot = process.getuid() === 0;
const pgUid = isRoot ? Number(execFileSync("id", ["-u", "postgres"]).toString().trim()) : process.getuid();
const freshKey = () => randomBytes(32).toString("base64");
const k = (b) => Buffer.from(b, "base64");

// The processes whose command line contains `text` (read from /proc: no pgrep needed).
function running(text) {
  return readdirSync("/proc").filter((p) => /^\d+$/.test(p) && p !== String(process.pid)).filter((p) => {
    try { return readFileSync(`/proc/${p}/cmdline`, "utf8").split("\0").join(" ").includes(text); } catch { return false; }
  });
}

const clusters = [];
after(() => clusters.forEach((c) => c.stop()));

// A cluster whose keys come from `cat <keys file>`; the file is the server user's, mode 0600.
function commandCluster(name, port, { env = {}, conf = [] } = {}) {
  const db = new Cluster(name, { port, env, conf });
  clusters.push(db);
  db.keysFile = join(db.dir, "keys.env");
  db.writeKeys = (text) => {
    writeFileSync(db.keysFile, text, { mode: 0o600 });
    chmodSync(db.keysFile, 0o600);
    if (isRoot) chownSync(db.keysFile, pgUid, pgUid);
  };
  db.conf.push(`provider_keys_encrypt.key_command = 'cat ${db.keysFile}'`);
  return db;
}

// start() wipes the cluster's directory: write the keys file once it exists again.
function startWith(db, keys) {
  db.createExtension = false;
  db.start();
  db.writeKeys(keys);
  db.restart();
  db.psql("CREATE EXTENSION provider_keys_encrypt");
  return db;
}

// An application's connection: it writes a plaintext key per iteration (the guard seals it) and
// reads back the one it wrote before, until stopped. Every failure is counted.
function application(db, { write, read }) {
  const s = db.session();
  const state = { i: 0, ok: 0, failed: [], stop: false };
  state.done = (async () => {
    while (!state.stop) {
      state.i++;
      const w = await s.send(write(state.i));
      const r = await s.send(read(state.i));
      if (/ERROR|FATAL/.test(w.err) || /ERROR|FATAL/.test(r.err) || r.out !== `sk-app-${state.i}`) {
        state.failed.push(`${state.i}: ${w.err} ${r.err} ${r.out}`.slice(0, 300));
      } else state.ok++;
    }
    await s.close();
  })();
  // resolve once the application has done `n` more iterations (any statement it had in flight
  // during a reload has finished: its next ones run under the new keys)
  state.after = async (n) => { const until = state.i + n; while (state.i < until) await sleep(10); };
  return state;
}

const report = (db, format) => Object.fromEntries(db.psql(
  `SELECT state, sum(keys) FROM provider_keys_encryption_report(format => '${format}') GROUP BY state`)
  .split("\n").filter(Boolean).map((l) => l.split("|")).map(([s, n]) => [s, Number(n)]));

test("base64: rotation by reload while an application writes; Node reads every row at the end", async () => {
  const OLD = freshKey(), NEW = freshKey();
  const db = startWith(commandCluster("key_command_b64", 54471), `ENCRYPTION_KEY=${OLD}\n`);
  assert.equal(db.psql("SHOW provider_keys_encrypt.encryption_key"), `from key_command, fingerprint ${b64.fingerprint(k(OLD))}`);
  db.script(`CREATE TABLE provider_key (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
    INSERT INTO provider_key SELECT 'k' || lpad(i::text, 4, '0'), 'sk-rot-' || i, 'openai' FROM generate_series(1, 500) i;`);
  db.run("CALL encrypt_provider_keys(guard => true, verbose => false)", { tuples: false });
  const app = application(db, {
    write: (i) => `INSERT INTO provider_key VALUES ('app${i}', 'sk-app-${i}', 'openai');`,
    read: (i) => `SELECT decrypt_token(token) FROM provider_key WHERE id = 'app${i}';`,
  });
  await app.after(5);

  // 1. the new key current, the old one previous: a reload
  db.writeKeys(`ENCRYPTION_KEY=${NEW}\nENCRYPTION_KEY_PREVIOUS=${OLD}\n`);
  db.reload();
  await app.after(5);
  assert.equal(db.psql("SELECT provider_keys_encrypt_fingerprint()"), b64.fingerprint(k(NEW)));
  const rotated = db.run("CALL reencrypt_provider_keys(verbose => false)", { tuples: false });
  assert.match(rotated.err, /re-encryption completed: .* \(verified: /);
  assert.equal(report(db, "base64").previous_key ?? 0, 0);

  // 2. the old key dropped: another reload
  db.writeKeys(`ENCRYPTION_KEY=${NEW}\n`);
  db.reload();
  await app.after(5);
  app.stop = true;
  await app.done;

  assert.deepEqual(app.failed, []);
  assert.ok(app.ok >= 15, `the application ran (${app.ok} iterations)`);
  const r = report(db, "base64");
  assert.equal(r.previous_key ?? 0, 0, "no row under a dropped key");
  assert.equal(r.unverified ?? 0, 0);
  assert.equal(r.plaintext ?? 0, 0);
  assert.match(db.psql("SHOW provider_keys_encrypt.previous_keys"), /^none \(key_command printed none\)$/);
  const rows = db.psql("SELECT id || '|' || token FROM provider_key").split("\n");
  assert.equal(rows.length, 500 + app.i);
  for (const row of rows) {
    const [id, token] = row.split("|");
    assert.equal(b64.decrypt(token, k(NEW)), id.startsWith("app") ? `sk-app-${id.slice(3)}` : `sk-rot-${Number(id.slice(1))}`);
  }
  // the keys never reached the server log
  for (const key of [OLD, NEW]) assert.ok(!db.log().includes(key));
});

test("llmgw: rotation of GATEWAY_API_KEY_HASH_SECRET by reload while the gateway writes", async () => {
  const OLD = "kc-old-" + randomBytes(8).toString("hex"), NEW = "kc-new-" + randomBytes(8).toString("hex");
  const db = startWith(commandCluster("key_command_llmgw", 54472), `GATEWAY_API_KEY_HASH_SECRET=${OLD}\n`);
  db.script(`CREATE TABLE provider_key (id text PRIMARY KEY, token text, token_ciphertext text, token_hash text,
      token_masked text, provider text NOT NULL, status text DEFAULT 'active', organization_id text);
    INSERT INTO provider_key (id, token, provider, organization_id)
      SELECT 'k' || lpad(i::text, 4, '0'), 'sk-rot-' || i, 'openai', CASE WHEN i % 3 = 0 THEN NULL ELSE 'org' || i % 5 END
      FROM generate_series(1, 500) i;`);
  db.run("CALL encrypt_provider_keys(format => 'llmgw', guard => true, verbose => false)", { tuples: false });
  const app = application(db, {
    write: (i) => `INSERT INTO provider_key (id, token, provider, organization_id) VALUES ('app${i}', 'sk-app-${i}', 'openai', 'org-app');`,
    read: (i) => `SELECT llmgw_decrypt_token(token_ciphertext, id, organization_id) FROM provider_key WHERE id = 'app${i}';`,
  });
  await app.after(5);

  db.writeKeys(`GATEWAY_API_KEY_HASH_SECRET = '${NEW}, ${OLD}'\n`);   // Debian's environment-file form
  db.reload();
  await app.after(5);
  assert.equal(db.psql("SELECT llmgw_key_id()"), gw.keyId(NEW));
  const rotated = db.run("CALL reencrypt_provider_keys(format => 'llmgw', verbose => false)", { tuples: false });
  assert.match(rotated.err, /re-encryption \(llmgw\) completed: .* \(verified: /);

  db.writeKeys(`GATEWAY_API_KEY_HASH_SECRET=${NEW}\n`);
  db.reload();
  await app.after(5);
  app.stop = true;
  await app.done;

  assert.deepEqual(app.failed, []);
  assert.ok(app.ok >= 15, `the application ran (${app.ok} iterations)`);
  const r = report(db, "llmgw");
  assert.equal(r.previous_key ?? 0, 0, "no row under a dropped secret");
  assert.equal(r.unverified ?? 0, 0);
  assert.equal(r.plaintext ?? 0, 0);
  const rows = db.readJson("SELECT json_build_object('id', id, 'ct', token_ciphertext, 'org', organization_id, 'hash', token_hash) FROM provider_key");
  assert.equal(rows.length, 500 + app.i);
  for (const { id, ct, org, hash } of rows) {
    const plain = id.startsWith("app") ? `sk-app-${id.slice(3)}` : `sk-rot-${Number(id.slice(1))}`;
    assert.equal(gw.decrypt([NEW], ct, id, org), plain);
    assert.equal(hash, gw.tokenHash([NEW], plain));
  }
  for (const s of [OLD, NEW]) assert.ok(!db.log().includes(s));
});

test("a command that fails, prints garbage or hangs keeps the keys it printed before; one failing at start refuses with its SQLSTATE", () => {
  const KEY = freshKey(), MARK = "sk-live-" + randomBytes(8).toString("hex");
  const db = startWith(commandCluster("key_command_fail", 54473, { conf: ["provider_keys_encrypt.key_command_timeout = 300", "log_error_verbosity = verbose"] }), `ENCRYPTION_KEY=${KEY}\n`);
  const token = db.psql("SELECT encrypt_token('sk-kept')");
  const fp = b64.fingerprint(k(KEY));
  // what the command prints comes from a file of the server's user: the marker never appears
  // in the command's text (PostgreSQL logs a changed setting's value on reload)
  const out = join(db.dir, "out.txt");
  const prints = (text) => {
    writeFileSync(out, text, { mode: 0o600 });
    if (isRoot) chownSync(out, pgUid, pgUid);
  };
  for (const [output, command, cause, sqlstate] of [
    [`ENCRYPTION_KEY=${freshKey()}\n${MARK}\n`, `cat ${out}; exit 3`, "exit status 3", "38000"],
    [`ENCRYPTION_KEY=${freshKey()}\n${MARK}\n`, `cat ${out}`, "not NAME=value (line 2)", "22P02"],
    [`ENCRYPTION_KEY=${freshKey()}\nENCRYPTION_KEY=${MARK}\n`, `cat ${out}`, "ENCRYPTION_KEY more than once", "22P02"],
    [`OTHER_VARIABLE=${MARK}\n`, `cat ${out}`, "printed none of", "55000"],
    [`ENCRYPTION_KEY=${MARK}\n`, `cat ${out}; sleep 30`, "did not finish within 300 ms", "57014"],
    // parseable, but no key: refused before it could replace the keys that work
    [`ENCRYPTION_KEY=\nGATEWAY_API_KEY_HASH_SECRET=${MARK}\n`, `cat ${out}`, "printed ENCRYPTION_KEY, which is refused: its value is empty", "22023"],
    [`ENCRYPTION_KEY=${MARK}\n`, `cat ${out}`, "printed ENCRYPTION_KEY, which is refused: ENCRYPTION_KEY must be a 32-byte key", "22023"],
  ]) {
    prints(output);
    db.psql(`ALTER SYSTEM SET provider_keys_encrypt.key_command = '${command.replace(/'/g, "''")}'`);
    const started = Date.now();
    db.reload();
    // SHOW never runs the command: the next statement that needs a key does (once)
    const before = db.psql("SHOW provider_keys_encrypt.encryption_key");
    assert.ok(before.startsWith(`from key_command, fingerprint ${fp}`) && !before.includes(cause), before);
    assert.equal(db.psql(`SELECT decrypt_token('${token}')`), "sk-kept");
    const shown = db.psql("SHOW provider_keys_encrypt.encryption_key");
    assert.ok(shown.startsWith(`from key_command, fingerprint ${fp} (the last run of key_command failed: `), shown);
    assert.ok(shown.includes(cause), `${command}: ${shown}`);
    assert.ok(!shown.includes(MARK));
    assert.ok(Date.now() - started < 15_000);
    // the LOG line, with its SQLSTATE (log_error_verbosity = verbose prints it)
    const line = db.log().split("\n").find((l) => l.includes(`LOG:  ${sqlstate}: provider_keys_encrypt: provider_keys_encrypt.key_command`) && l.includes(cause));
    assert.ok(line, `${command}: no LOG line with ${sqlstate} and "${cause}"`);
    assert.match(line, /stay in use$/);
  }
  const log = db.log();
  assert.ok(!log.includes(MARK), "no byte of the output in the log");
  assert.ok(!log.includes(KEY));

  // a command that fails from the start, with no key in the environment: every function that
  // needs the key refuses with the command's SQLSTATE, and SHOW says why
  db.psql("ALTER SYSTEM SET provider_keys_encrypt.key_command = 'exit 7'");
  db.restart();
  const refused = db.run("SELECT encrypt_token('x')", { allowFail: true, verbose: true });
  assert.match(refused.err, /ERROR:\s+38000: provider_keys_encrypt.key_command failed: exit status 7/);
  assert.match(refused.err, /HINT:.*pg_reload_conf/);
  assert.match(db.psql("SHOW provider_keys_encrypt.encryption_key"), /^refused: provider_keys_encrypt.key_command failed: exit status 7/);
  // fixed by a reload, no restart
  db.psql(`ALTER SYSTEM SET provider_keys_encrypt.key_command = 'cat ${db.keysFile}'`);
  db.reload();
  assert.equal(db.psql(`SELECT decrypt_token('${token}')`), "sk-kept");
});

test("the command wins over the environment and the log says so (names only); who can see what", () => {
  const ENV_KEY = freshKey(), CMD_KEY = freshKey(), SECRET = "kc-env-" + randomBytes(8).toString("hex");
  const db = startWith(commandCluster("key_command_env", 54474, { env: { ENCRYPTION_KEY: ENV_KEY, GATEWAY_API_KEY_HASH_SECRET: SECRET } }),
    `ENCRYPTION_KEY=${CMD_KEY}\n`);
  assert.equal(db.psql("SELECT provider_keys_encrypt_fingerprint()"), b64.fingerprint(k(CMD_KEY)));
  // what the command did not print is not set: the environment is not mixed in
  assert.equal(db.psql("SHOW provider_keys_encrypt.gateway_api_key_hash_secret"), "not set (key_command printed none)");
  assert.match(db.log(), /LOG:  provider_keys_encrypt: key_command is set, so the keys it prints are used, not ENCRYPTION_KEY, GATEWAY_API_KEY_HASH_SECRET from the server's environment/);
  // without the command (a reload), the environment again
  db.psql("ALTER SYSTEM SET provider_keys_encrypt.key_command = ''");
  db.reload();
  assert.equal(db.psql("SELECT provider_keys_encrypt_fingerprint()"), b64.fingerprint(k(ENV_KEY)));
  db.psql(`ALTER SYSTEM SET provider_keys_encrypt.key_command = 'cat ${db.keysFile}'`);
  db.reload();

  // observers: a plain role, a pg_read_all_settings member, a pg_monitor member
  db.script(`CREATE ROLE plain LOGIN; CREATE ROLE reader LOGIN IN ROLE pg_read_all_settings; CREATE ROLE monitor LOGIN IN ROLE pg_monitor;`);
  const probe = `SHOW provider_keys_encrypt.key_command; SHOW provider_keys_encrypt.encryption_key;
    SELECT name, setting FROM pg_settings WHERE name LIKE 'provider_keys_encrypt%';
    SELECT name, setting FROM pg_file_settings; SELECT query FROM pg_stat_activity;`;
  for (const user of ["plain", "reader", "monitor"]) {
    const seen = db.probe(probe, { user });
    const all = seen.out + seen.err;
    for (const secret of [ENV_KEY, CMD_KEY, SECRET]) assert.ok(!all.includes(secret), `${user} saw a key`);
    if (user === "plain") assert.match(all, /permission denied to examine "provider_keys_encrypt.key_command"|must be superuser or have privileges of pg_read_all_settings to examine/);
    else assert.ok(all.includes(`cat ${db.keysFile}`), `${user} sees the command itself, not its output`);
  }
  // only a superuser sets it, and only where the server reads its configuration
  assert.match(db.run("SET provider_keys_encrypt.key_command = 'echo'", { allowFail: true, verbose: true }).err, /55P02/);
  assert.match(db.run("ALTER SYSTEM SET provider_keys_encrypt.key_command = 'echo'", { user: "monitor", allowFail: true, verbose: true }).err, /42501/);
  assert.ok(!db.log().includes(CMD_KEY) && !db.log().includes(ENV_KEY));
});

test("a reload during a CALL: the run ends under the keys it started with and its summary says so", async () => {
  const OLD = freshKey(), NEW = freshKey();
  const db = startWith(commandCluster("key_command_call", 54475), `ENCRYPTION_KEY=${OLD}\n`);
  db.script(`CREATE TABLE provider_key (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
    INSERT INTO provider_key SELECT 'k' || lpad(i::text, 6, '0'), 'sk-call-' || i, 'openai' FROM generate_series(1, 40000) i;`);
  const run = db.background("CALL encrypt_provider_keys(batch_size => 100, verbose => false)", { appName: "the_run" });
  // once the run has committed a few batches, the keys change
  for (let i = 0; Number(db.psql("SELECT count(*) FROM provider_key WHERE length(token) > 40")) < 1000; i++) {
    assert.ok(i < 3000, "the run did not start");
    await sleep(10);
  }
  db.writeKeys(`ENCRYPTION_KEY=${NEW}\nENCRYPTION_KEY_PREVIOUS=${OLD}\n`);
  db.reload();
  const { err, status } = await run.done;
  assert.equal(status, 0, err);
  assert.match(err, /encryption migration completed: total=40000, encrypted=40000/);
  assert.match(err, /NOTICE: {2}The server's configuration was reloaded during this run: it ran to the end under the keys it started with\. The keys provider_keys_encrypt\.key_command prints now apply from the next statement: run it again to use them\./);
  // every row the run wrote is under the key it started with; the next statement has the new keys
  const tokens = db.psql("SELECT token FROM provider_key WHERE id IN ('k000001', 'k020000', 'k040000')").split("\n");
  for (const t of tokens) assert.match(b64.decrypt(t, k(OLD)), /^sk-call-\d+$/);
  assert.equal(report(db, "base64").previous_key, 40000);
  db.run("CALL reencrypt_provider_keys(verbose => false)", { tuples: false });
  assert.equal(report(db, "base64").current_key, 40000);
});

test("one run per reload for the whole server; a failed reload keeps the newest keys for new sessions too; parallel workers, SHOW and pg_settings never run it; a hanging run ends at its time limit, its waiters cancel at once", async (t) => {
  const K1 = freshKey(), K2 = freshKey(), K3 = freshKey();
  const db = startWith(commandCluster("key_command_shared", 54476, { conf: ["provider_keys_encrypt.key_command_timeout = 60000"] }), `ENCRYPTION_KEY=${K1}\n`);
  // the command counts its runs, a line each, in a file of the server's user
  const runs = join(db.dir, "runs.txt");
  db.psql(`ALTER SYSTEM SET provider_keys_encrypt.key_command = 'echo run >> ${runs}; cat ${db.keysFile}'`);
  db.reload();
  const count = () => (existsSync(runs) ? readFileSync(runs, "utf8").split("\n").filter(Boolean).length : 0);
  const fp = (key) => b64.fingerprint(k(key));
  const fingerprint = "SELECT provider_keys_encrypt_fingerprint();";
  const sessions = [1, 2, 3, 4, 5, 6].map(() => db.session());
  t.after(() => Promise.all(sessions.map((s) => s.close())));
  const everyone = async () => Promise.all(sessions.map(async (s) => (await s.send(fingerprint)).out));
  assert.deepEqual(await everyone(), Array(6).fill(fp(K1)));
  assert.equal(count(), 1, "six sessions, one reload: one run");

  // a new key by reload: every open session takes it at its next statement, from one run
  db.writeKeys(`ENCRYPTION_KEY=${K2}\n`);
  db.reload();
  assert.deepEqual(await everyone(), Array(6).fill(fp(K2)));
  assert.equal(db.psql(fingerprint), fp(K2));
  assert.equal(count(), 2);

  // a reload whose run fails keeps the newest good keys: for the open sessions and for a
  // session started afterwards (not the keys the server started with)
  db.writeKeys("this is not NAME=value\n");
  db.reload();
  assert.deepEqual(await everyone(), Array(6).fill(fp(K2)));
  assert.equal(db.psql(fingerprint), fp(K2));
  assert.equal(count(), 3);
  assert.match(db.psql("SHOW provider_keys_encrypt.encryption_key"), new RegExp(`^from key_command, fingerprint ${fp(K2)} \\(the last run of key_command failed: .*line 1\\)\\)$`));

  // SHOW and pg_settings (any role) read shared memory only: no run
  db.writeKeys(`ENCRYPTION_KEY=${K3}\nENCRYPTION_KEY_PREVIOUS=${K2}\n`);
  db.script("CREATE TABLE t AS SELECT i, encrypt_token('sk-par-' || i) AS token FROM generate_series(1, 20000) i; CREATE ROLE plain LOGIN;");
  db.reload();
  // SHOW says the reload waits for a run (it shows the newest keys fetched)
  assert.match(db.psql("SHOW provider_keys_encrypt.encryption_key"), /\(a reload is pending: key_command runs at the next statement that needs a key\)$/);
  for (let i = 0; i < 3; i++) {
    db.psql("SHOW provider_keys_encrypt.encryption_key");
    db.probe("SELECT name, setting FROM pg_settings WHERE name LIKE 'provider_keys_encrypt%'", { user: "plain" });
  }
  assert.equal(count(), 3, "SHOW and pg_settings ran the command");

  // a parallel plan: the leader answers the reload, its workers use its keys and never run it
  const parallel = `SET parallel_setup_cost = 0; SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0;
    SET max_parallel_workers_per_gather = 4; SET parallel_leader_participation = off;`;
  const plan = db.psql(`${parallel} EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT count(*) FROM t WHERE decrypt_token(token) = 'sk-par-' || i`);
  assert.match(plan, /Workers Launched: [1-9]/, plan);
  assert.equal(db.psql(`${parallel} SELECT count(*) FROM t WHERE decrypt_token(token) = 'sk-par-' || i`), "20000");
  assert.equal(count(), 4, "the workers ran the command");
  // the same for a role that is not a superuser (the leader's setting reaches its workers)
  db.psql("GRANT SELECT ON t TO plain; GRANT EXECUTE ON FUNCTION decrypt_token(text) TO plain");
  const asPlain = db.run(`${parallel} EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT count(*) FROM t WHERE decrypt_token(token) = 'sk-par-' || i; SELECT count(*) FROM t WHERE decrypt_token(token) = 'sk-par-' || i`, { user: "plain" }).out.trim();
  assert.match(asPlain, /Workers Launched: [1-9]/, asPlain);
  assert.match(asPlain, /\n20000$/, asPlain);
  assert.equal(count(), 4);
  assert.deepEqual(await everyone(), Array(6).fill(fp(K3)));
  assert.equal(count(), 4);

  // a command that hangs: it is killed at key_command_timeout; a cancel of the session running
  // it takes effect then (not before: cancelling cannot make the server start it again and
  // again), while a session waiting for it is cancelled at once
  db.psql("ALTER SYSTEM SET provider_keys_encrypt.key_command_timeout = '1500ms'");
  db.psql(`ALTER SYSTEM SET provider_keys_encrypt.key_command = 'echo run >> ${runs}; sleep 29.25; cat ${db.keysFile}'`);
  db.reload();
  const before = count();
  const started = Date.now();
  const runner = sessions[0].send("SET statement_timeout = '300ms'; SELECT provider_keys_encrypt_fingerprint(); RESET statement_timeout;");
  await sleep(100);
  const waiter = await sessions[1].send("SET statement_timeout = '300ms'; SELECT provider_keys_encrypt_fingerprint(); RESET statement_timeout;");
  assert.match(waiter.err, /canceling statement due to statement timeout/);
  assert.ok(Date.now() - started < 1200, "the waiting session was cancelled at once");
  await runner;
  const took = Date.now() - started;
  assert.ok(took >= 1400 && took < 5000, `the run ended at key_command_timeout (${took} ms)`);
  await sleep(200);
  assert.deepEqual(running("sleep 29.25"), [], "the command was killed");
  // that run answered the reload (it failed: the keys stay): cancelled statements start no other
  for (let i = 0; i < 6; i++) assert.equal((await sessions[i].send(fingerprint)).out, fp(K3));
  assert.equal(count() - before, 1);
  assert.match(db.psql("SHOW provider_keys_encrypt.encryption_key"), /\(the last run of key_command failed: provider_keys_encrypt\.key_command did not finish within 1500 ms and was killed\)$/);
  // the next statement that needs a key tries again; here with a command that works
  db.psql(`ALTER SYSTEM SET provider_keys_encrypt.key_command = 'cat ${db.keysFile}'`);
  db.reload();
  assert.deepEqual(await everyone(), Array(6).fill(fp(K3)));
  for (const key of [K1, K2, K3]) assert.ok(!db.log().includes(key));
});

test("reencrypt waits for a transaction still sealing under the keys from before the reload: the old key can then really be dropped", async (t) => {
  const K1 = freshKey(), K2 = freshKey();
  const db = startWith(commandCluster("key_command_inflight", 54477, { conf: ["max_prepared_transactions = 2"] }), `ENCRYPTION_KEY=${K1}\n`);
  db.script(`CREATE TABLE provider_key (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
    INSERT INTO provider_key SELECT 'k' || i, 'sk-before-' || i, 'openai' FROM generate_series(1, 100) i;`);
  db.run("CALL encrypt_provider_keys(guard => true, verbose => false)", { tuples: false });
  // an application's transaction writes a key (the guard seals it under K1) and stays open
  const app = db.session();
  t.after(() => app.close());
  assert.equal((await app.send("BEGIN; INSERT INTO provider_key VALUES ('inflight', 'sk-inflight', 'openai');")).err, "");
  // and another's statement, begun before the reload, writes one after it (under K1: a session
  // takes a reload between statements)
  const late = db.session();
  t.after(() => late.close());
  assert.equal((await late.send("SELECT provider_keys_encrypt_fingerprint();")).out, b64.fingerprint(k(K1)));
  const lateInsert = late.send("INSERT INTO provider_key SELECT 'late', 'sk-late', 'openai' FROM pg_sleep(2);");
  // the rotation: K2 current, K1 previous, a reload, the re-encryption
  db.writeKeys(`ENCRYPTION_KEY=${K2}\nENCRYPTION_KEY_PREVIOUS=${K1}\n`);
  db.reload();
  const rotation = db.background("CALL reencrypt_provider_keys(verbose => false)", { appName: "rotation" });
  let waiting = "";
  for (let i = 0; i < 500 && waiting !== "virtualxid"; i++) {
    await sleep(10);
    waiting = db.psql("SELECT coalesce(wait_event, '') FROM pg_stat_activity WHERE application_name = 'rotation'");
  }
  assert.equal(waiting, "virtualxid", "the re-encryption waits for the open transaction");
  // the transaction's next statement runs under the new keys; then it commits
  assert.equal((await app.send("INSERT INTO provider_key VALUES ('inflight2', 'sk-inflight-2', 'openai'); COMMIT;")).err, "");
  assert.equal((await lateInsert).err, "");
  const { err, status } = await rotation.done;
  assert.equal(status, 0, err);
  assert.match(err, /NOTICE: {2}waiting for 2 session\(s\) whose transaction or CALL still uses the keys from before the last reload \(pid \d+, \d+\)/);
  assert.match(err, /ENCRYPTION_KEY_PREVIOUS can be removed/);
  assert.equal(report(db, "base64").previous_key ?? 0, 0);
  // the old key dropped: every row, the one written in flight too, opens under K2 in Node
  db.writeKeys(`ENCRYPTION_KEY=${K2}\n`);
  db.reload();
  const rows = db.psql("SELECT id || '|' || token FROM provider_key").split("\n");
  assert.equal(rows.length, 103);
  for (const row of rows) {
    const [id, token] = row.split("|");
    const want = { inflight: "sk-inflight", inflight2: "sk-inflight-2", late: "sk-late" }[id] ?? `sk-before-${id.slice(1)}`;
    assert.equal(b64.decrypt(token, k(K2)), want);
  }
  // a transaction that used the command's keys cannot be prepared: it would outlive its session
  const prepared = db.run("BEGIN; INSERT INTO provider_key VALUES ('p', 'sk-prepared', 'openai'); PREPARE TRANSACTION 'p1';", { allowFail: true, verbose: true });
  assert.match(prepared.err, /ERROR:\s+0A000: a transaction that used keys from provider_keys_encrypt\.key_command cannot be prepared/);
  // nor one whose keys were used only by a parallel worker (it marks its leader's slot)
  // (PostgreSQL 15 calls debug_parallel_query force_parallel_mode)
  const forceParallel = Number(db.psql("SHOW server_version_num")) >= 160000 ? "debug_parallel_query" : "force_parallel_mode";
  assert.match(db.psql(`SET ${forceParallel} = on; EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT encrypt_token('sk-prepared') FROM generate_series(1, 1)`),
    /Workers Launched: 1\n\s*Single Copy: true/);
  const viaWorker = db.run(`SELECT encrypt_token('warm'); BEGIN; SET LOCAL ${forceParallel} = on;
    CREATE TABLE stash AS SELECT encrypt_token('sk-prepared') AS t FROM generate_series(1, 1);
    PREPARE TRANSACTION 'p2';`, { allowFail: true, verbose: true });
  assert.match(viaWorker.err, /ERROR:\s+0A000: a transaction that used keys from provider_keys_encrypt\.key_command cannot be prepared/);
  assert.equal(db.psql("SELECT count(*) FROM pg_prepared_xacts"), "0");

  // a session that used keys and left empties its slot: a session after it that has not used
  // keys is not waited for, even in a transaction
  const K3 = freshKey();
  db.psql("SELECT encrypt_token('then gone')");
  const other = db.session();
  t.after(() => other.close());
  await other.send("BEGIN; SELECT 1;");
  db.writeKeys(`ENCRYPTION_KEY=${K3}\nENCRYPTION_KEY_PREVIOUS=${K2}\n`);
  db.reload();
  const third = db.run("CALL reencrypt_provider_keys(verbose => false)", { tuples: false });
  assert.doesNotMatch(third.err, /waiting for/);
  assert.match(third.err, /ENCRYPTION_KEY_PREVIOUS can be removed/);
  await other.send("COMMIT;");
  // without a key command there is nothing to wait for: the function returns 0 at once
  db.psql("ALTER SYSTEM SET provider_keys_encrypt.key_command = ''");
  db.reload();
  assert.equal(db.psql("SELECT pke_internal.wait_for_older_keys()"), "0");
});
