// Benchmark of the key command (issue 20): see bench/key_command. Measured in one run:
//   1. the per-row functions against md5 on a server whose keys come from the environment and
//      on one whose keys come from provider_keys_encrypt.key_command (the same keys): a key use
//      costs the same either way (one comparison per call when no reload is pending);
//   2. what one reload costs: the first statement that needs a key after a reload (it runs the
//      command, here `cat` of a file) against the same statement without a reload, and how many
//      times the command ran for the whole server when many sessions answered one reload.
// --env-only measures section 1 on the environment's server only (for builds without
// key_command: the "before" of BENCHMARKS.md).
import { writeFileSync, readFileSync, existsSync, chownSync } from "node:fs";
import { execFileSync } from "node:child_process";
import os from "node:os";
import { join } from "node:path";
import { Cluster, TEST_KEY } from "../tests/integration/cluster.mjs";

const argv = process.argv.slice(2);
const smoke = argv.includes("--smoke");
const envOnly = argv.includes("--env-only");
const rowsArg = argv.indexOf("--rows");
const N = rowsArg >= 0 ? Number(argv[rowsArg + 1]) : smoke ? 2000 : 1_000_000;
const REPEAT = smoke ? 1 : 5;
const RELOADS = smoke ? 3 : 20;
const SESSIONS = smoke ? 4 : 32;
const GATEWAY_SECRET = "bench-gateway-secret";
const pgUid = process.getuid() === 0 ? Number(execFileSync("id", ["-u", "postgres"]).toString().trim()) : process.getuid();
const now = () => Number(process.hrtime.bigint()) / 1e9;
const loadAtStart = os.loadavg()[0];

const servers = [];
process.on("exit", () => servers.forEach((s) => s.stop()));

function server(name, port, command) {
  const db = new Cluster(name, {
    port,
    env: command ? {} : { ENCRYPTION_KEY: TEST_KEY, GATEWAY_API_KEY_HASH_SECRET: GATEWAY_SECRET },
    conf: ["shared_buffers = '512MB'", "max_parallel_workers_per_gather = 0"],
    createExtension: false,
  });
  servers.push(db);
  db.start();
  if (command) {
    db.keysFile = join(db.dir, "keys.env");
    db.runs = join(db.dir, "runs.txt");
    db.writeKeys = (text) => {
      writeFileSync(db.keysFile, text, { mode: 0o600 });
      if (process.getuid() === 0) chownSync(db.keysFile, pgUid, pgUid);
    };
    db.writeKeys(`ENCRYPTION_KEY=${TEST_KEY}\nGATEWAY_API_KEY_HASH_SECRET=${GATEWAY_SECRET}\n`);
    db.appendConf([`provider_keys_encrypt.key_command = 'echo run >> ${db.runs}; cat ${db.keysFile}'`]);
    db.restart();
  }
  db.script(`CREATE EXTENSION provider_keys_encrypt;
    CREATE FUNCTION bench_ms(q text) RETURNS double precision LANGUAGE plpgsql AS $$
      DECLARE t0 timestamptz := clock_timestamp(); BEGIN EXECUTE q; RETURN extract(epoch FROM clock_timestamp() - t0) * 1000; END $$;
    CREATE TABLE src AS SELECT 'pk_' || lpad(i::text, 8, '0') AS id, 'sk-proj-' || substr(repeat(md5(i::text), 3), 1, 24 + i % 60) AS token,
      CASE WHEN i % 5 = 0 THEN NULL ELSE 'org-' || i % 100 END AS org FROM generate_series(1, ${N}) i;
    CREATE TABLE enc AS SELECT id, encrypt_token(token) AS token FROM src;
    VACUUM ANALYZE src; VACUUM ANALYZE enc;`);
  return db;
}

function timeSql(db, sql) {
  let best = Infinity;
  for (let r = 0; r < REPEAT; r++) best = Math.min(best, Number(db.psql(`SELECT bench_ms($q$${sql}$q$)`)) / 1000);
  return best;
}

const QUERIES = [
  ["md5(token) — floor", "SELECT sum(length(md5(token))) FROM src"],
  ["encrypt_token(token)", "SELECT sum(length(encrypt_token(token))) FROM src"],
  ["decrypt_token(token)", "SELECT sum(length(decrypt_token(token))) FROM enc"],
  ["is_encrypted_token(token)", "SELECT count(*) FILTER (WHERE is_encrypted_token(token)) FROM enc"],
  ["llmgw_encrypt_token(token, id, org)", "SELECT sum(length(llmgw_encrypt_token(token, id, org))) FROM src"],
];

const fmt = (n) => Math.round(n).toLocaleString("en");
console.log(`# provider_keys_encrypt key_command benchmark — ${N.toLocaleString("en")} rows${smoke ? " (smoke)" : ""}, best of ${REPEAT}`);
const env = server("bench_kc_env", 54430, false);
const cmd = envOnly ? null : server("bench_kc_cmd", 54431, true);
console.log(`\n## 1. Per-row functions (rows/s; ratio: the function's time over md5's in the same server)\n`);
console.log(`| function | environment's keys | ratio | key_command's keys | ratio | command / environment |`);
console.log(`|---|---:|---:|---:|---:|---:|`);
// alternate the servers query by query, so drift on the machine hits both alike
const floor = {};
for (const [name, sql] of QUERIES) {
  const e = timeSql(env, sql);
  const c = cmd ? timeSql(cmd, sql) : NaN;
  if (!floor.env) { floor.env = e; floor.cmd = c; }
  const cells = cmd
    ? [fmt(N / c), (c / floor.cmd).toFixed(2), (e / c).toFixed(2)]
    : ["—", "—", "—"];
  console.log(`| ${name} | ${fmt(N / e)} | ${(e / floor.env).toFixed(2)} | ${cells[0]} | ${cells[1]} | ${cells[2]} |`);
}

if (cmd) {
  console.log(`\n## 2. What a reload costs (key_command = 'echo run >> runs.txt; cat keys.env')\n`);
  const count = () => (existsSync(cmd.runs) ? readFileSync(cmd.runs, "utf8").split("\n").filter(Boolean).length : 0);
  const s = cmd.session();
  const stmt = "SELECT bench_ms('SELECT provider_keys_encrypt_fingerprint()');";
  await s.send(stmt);
  let steady = 0, first = 0;
  for (let i = 0; i < RELOADS; i++) {
    steady += Number((await s.send(stmt)).out);
    cmd.reload();
    first += Number((await s.send(stmt)).out);
  }
  console.log(`| statement | ms (mean of ${RELOADS}) |`);
  console.log(`|---|---:|`);
  console.log(`| provider_keys_encrypt_fingerprint(), no reload pending | ${(steady / RELOADS).toFixed(3)} |`);
  console.log(`| the same, first after a reload (runs the command, publishes, parses) | ${(first / RELOADS).toFixed(3)} |`);
  await s.close();
  const sessions = Array.from({ length: SESSIONS }, () => cmd.session());
  await Promise.all(sessions.map((x) => x.send("SELECT provider_keys_encrypt_fingerprint();")));
  const before = count();
  cmd.reload();
  const t0 = now();
  const seen = await Promise.all(sessions.map((x) => x.send("SELECT provider_keys_encrypt_fingerprint();")));
  const secs = now() - t0;
  await Promise.all(sessions.map((x) => x.close()));
  const same = new Set(seen.map((r) => r.out)).size === 1;
  console.log(`\n${SESSIONS} sessions answered one reload at once in ${(secs * 1000).toFixed(1)} ms: the command ran ${count() - before} time(s) for the whole server; ${same ? "every session had the same keys" : "the sessions DISAGREED"}.`);
}
console.log(`\nload average ${loadAtStart.toFixed(1)} at the start, ${os.loadavg()[0].toFixed(1)} at the end; ${os.cpus().length} CPUs (${os.cpus()[0].model}).`);
