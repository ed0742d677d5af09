// Benchmark: see bench/run. Everything is measured in this one run on the same data.
import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { Cluster, TEST_KEY } from "../tests/integration/cluster.mjs";

const argv = process.argv.slice(2);
const smoke = argv.includes("--smoke");
const record = argv.includes("--record");
const jsonArg = argv.indexOf("--json");   // also write the results as JSON (scripts/musl/bench compares two runs)
const rowsArg = argv.indexOf("--rows");
const N = rowsArg >= 0 ? Number(argv[rowsArg + 1]) : smoke ? 2000 : 1_000_000;
const NODE_N = smoke ? 500 : 50_000;
const MEM_SIZES = smoke ? [1000, 2000] : [100_000, 1_000_000];
const REPEAT = smoke ? 1 : 3;

const GATEWAY_SECRET = "bench-gateway-secret";  // GATEWAY_API_KEY_HASH_SECRET (format llmgw)
const db = new Cluster("bench", {
  port: 54420,
  env: { ENCRYPTION_KEY: TEST_KEY, GATEWAY_API_KEY_HASH_SECRET: GATEWAY_SECRET },
  conf: ["shared_buffers = '1GB'", "max_wal_size = '4GB'", "checkpoint_timeout = '30min'", "synchronous_commit = on"],
});
db.start();
process.on("exit", () => db.stop());
const now = () => Number(process.hrtime.bigint()) / 1e9;
// other work on the machine skews every figure (ratios less than throughputs): say how loaded it was
const loadAtStart = os.loadavg()[0];

// Realistic provider keys: 32-110 chars; hex, alphanumeric and prefixed shapes; 80% active,
// 10% inactive, 10% deleted. Deterministic (md5 of the row number), so every copy is identical.
function makeData(table, n) {
  db.script(`SET client_min_messages = warning; DROP TABLE IF EXISTS ${table};
    CREATE UNLOGGED TABLE ${table}_tmp AS
    SELECT 'pk_' || lpad(i::text, 8, '0') AS id,
           CASE i % 4
             WHEN 0 THEN substr(repeat(md5(i::text), 4), 1, 64)                                     -- 64 hex
             WHEN 1 THEN 'sk-proj-' || substr(replace(encode(sha256(i::text::bytea), 'base64'), '/', '_'), 1, 24 + i % 60)
             WHEN 2 THEN 'sk-ant-api03-' || substr(repeat(md5(i::text || 'a'), 4), 1, 19 + i % 78)
             ELSE substr(replace(replace(encode(sha512(i::text::bytea), 'base64'), '+', 'x'), '/', 'y'), 1, 32 + i % 8)  -- 40 alnum
           END AS token,
           (ARRAY['openai','anthropic','google-vertex','mistral','groq'])[1 + i % 5] AS provider,
           CASE WHEN i % 10 = 8 THEN 'inactive' WHEN i % 10 = 9 THEN 'deleted' ELSE 'active' END AS status
    FROM generate_series(1, ${n}) i;
    CREATE TABLE ${table} (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active',
                           created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now(), base_url text, organization_id text);
    INSERT INTO ${table} (id, token, provider, status) SELECT * FROM ${table}_tmp;
    DROP TABLE ${table}_tmp;
    VACUUM ANALYZE ${table};`);
}

// The same rows on the gateway's rollout schema (format llmgw): token nullable, the three new
// columns, the XOR constraint; organization_id NULL (managed) for every fifth row.
function makeGatewayTable(table, from) {
  db.script(`SET client_min_messages = warning; DROP TABLE IF EXISTS ${table};
    CREATE TABLE ${table} (id text PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now(),
                           updated_at timestamptz NOT NULL DEFAULT now(), token text, token_ciphertext text,
                           token_masked text, token_hash text, provider text NOT NULL, base_url text,
                           status text DEFAULT 'active', organization_id text, managed boolean NOT NULL DEFAULT false,
                           CONSTRAINT ${table}_token_xor CHECK ((token IS NULL) <> (token_ciphertext IS NULL)));
    INSERT INTO ${table} (id, token, provider, status, organization_id, managed)
    SELECT id, token, provider, status, CASE WHEN right(id, 1) IN ('0', '5') THEN NULL ELSE 'org-' || right(id, 3) END,
           right(id, 1) IN ('0', '5')
      FROM ${from};
    VACUUM ANALYZE ${table};`);
}

function timeSql(sql, { reps = REPEAT } = {}) {
  let best = Infinity;
  for (let r = 0; r < reps; r++) {
    const ms = Number(db.psql(`SELECT bench_ms($q$${sql}$q$)`));
    best = Math.min(best, ms / 1000);
  }
  return best;
}

function timeCall(sql, prepare, reps = REPEAT) {
  let best = Infinity;
  for (let r = 0; r < reps; r++) {
    prepare();
    db.psql("CHECKPOINT");
    const t0 = now();
    const res = db.run(sql, { tuples: false });
    best = Math.min(best, now() - t0);
    if (!/errors=0/.test(res.err) && /CALL/.test(sql)) throw new Error(res.err.slice(-500));
  }
  return best;
}

// pgcrypto is a baseline only where the installation has it (the 16 and 18 wheels have no contrib)
const hasPgcrypto = db.psql("SELECT count(*) FROM pg_available_extensions WHERE name = 'pgcrypto'") === "1";
if (hasPgcrypto) db.psql("CREATE EXTENSION pgcrypto");
else console.log("pgcrypto is not in this PostgreSQL installation: its baseline row is left out");
db.script(`CREATE FUNCTION bench_ms(q text) RETURNS double precision LANGUAGE plpgsql AS $$
  DECLARE t0 timestamptz := clock_timestamp(); BEGIN EXECUTE q; RETURN extract(epoch FROM clock_timestamp() - t0) * 1000; END $$;`);

console.log(`# provider_keys_encrypt benchmark — ${N.toLocaleString("en")} rows${smoke ? " (smoke)" : ""}`);
makeData("src", N);
db.script("CREATE TABLE enc AS SELECT id, encrypt_token(token) AS token FROM src; VACUUM ANALYZE enc;");
const active = Number(db.psql("SELECT count(*) FROM src WHERE status IS DISTINCT FROM 'deleted'"));

const results = [];
const add = (group, name, rows, secs, baseline) => results.push({ group, name, rows, secs, rps: rows / secs, baseline });

// 1. per-row functions vs the md5 floor and pgcrypto
const md5 = timeSql("SELECT sum(length(md5(token))) FROM src");
add(1, "md5(token) — floor", N, md5);
add(1, "encrypt_token(token)", N, timeSql("SELECT sum(length(encrypt_token(token))) FROM src"), "md5(token) — floor");
add(1, "decrypt_token(token)", N, timeSql("SELECT sum(length(decrypt_token(token))) FROM enc"), "md5(token) — floor");
add(1, "is_encrypted_token(token) — tokens", N, timeSql("SELECT count(*) FILTER (WHERE is_encrypted_token(token)) FROM enc"), "md5(token) — floor");
add(1, "is_encrypted_token(token) — plaintext", N, timeSql("SELECT count(*) FILTER (WHERE is_encrypted_token(token)) FROM src"), "md5(token) — floor");
add(1, "llmgw_encrypt_token(token, id, organization_id)", N,
  timeSql("SELECT sum(length(llmgw_encrypt_token(token, id, CASE WHEN right(id, 1) IN ('0', '5') THEN NULL ELSE 'org-' || right(id, 3) END))) FROM src"),
  "md5(token) — floor");
add(1, "llmgw_token_hash(token)", N, timeSql("SELECT sum(length(llmgw_token_hash(token))) FROM src"), "md5(token) — floor");
add(1, "llmgw_mask_token(token)", N, timeSql("SELECT sum(length(llmgw_mask_token(token))) FROM src"), "md5(token) — floor");
if (hasPgcrypto) add(1, "pgcrypto encrypt_iv aes-cbc (no auth)", N,
  timeSql("SELECT sum(length(encrypt_iv(convert_to(token, 'UTF8'), decode('" + Buffer.from(TEST_KEY, "base64").toString("hex") + "', 'hex'), gen_random_bytes(16), 'aes-cbc/pad:pkcs'))) FROM src"),
  "md5(token) — floor");

// 2. the CALL vs a bare set-based UPDATE, on fresh copies of the same rows
const fresh = () => db.script("SET client_min_messages = warning; DROP TABLE IF EXISTS provider_key; CREATE TABLE provider_key (LIKE src INCLUDING ALL); INSERT INTO provider_key SELECT * FROM src; VACUUM ANALYZE provider_key;");
const bare = timeCall("UPDATE provider_key SET token = encrypt_token(token) WHERE status IS DISTINCT FROM 'deleted'", fresh);
add(2, "bare UPDATE … SET token = encrypt_token(token)", active, bare);
add(2, "CALL encrypt_provider_keys(verbose => false)", active, timeCall("CALL encrypt_provider_keys(verbose => false)", fresh), "bare UPDATE … SET token = encrypt_token(token)");
add(2, "CALL encrypt_provider_keys() — verbose", active, timeCall("CALL encrypt_provider_keys()", fresh), "bare UPDATE … SET token = encrypt_token(token)");
// the all-skipped re-run against a plain classification scan of the same (encrypted) rows
add(2, "classification scan: count(*) FILTER (WHERE is_encrypted_token(token))", active,
  timeSql("SELECT count(*) FILTER (WHERE is_encrypted_token(token)) FROM provider_key WHERE status IS DISTINCT FROM 'deleted'"));
add(2, "CALL encrypt_provider_keys() — 2nd run (all skipped)", active, timeCall("CALL encrypt_provider_keys(verbose => false)", () => {}),
  "classification scan: count(*) FILTER (WHERE is_encrypted_token(token))");
// what the final check of a first run costs on its own: the scan after the last batch (0.2.1),
// against the whole CALL it is part of (a ratio of 20× means 5% of the CALL)
add(2, "final check alone: the scan of every row after the last batch", active,
  timeSql("SELECT pke_internal.state_counts(pke_internal.mode('encrypt', 'base64', true, 'provider_key'::regclass), 'provider_key'::regclass)"),
  "CALL encrypt_provider_keys(verbose => false)");

// 3. the gateway's way: a Node script with the pg client, row by row (its guide's method)
{
  makeData("gw_src", NODE_N);
  db.script("SET client_min_messages = warning; DROP TABLE IF EXISTS provider_key; CREATE TABLE provider_key (LIKE gw_src INCLUDING ALL); INSERT INTO provider_key SELECT * FROM gw_src;");
  const out = execFileSync("node", [new URL("./gateway_migration.mjs", import.meta.url).pathname], {
    env: { ...process.env, ENCRYPTION_KEY: TEST_KEY, PGHOST: db.dir, PGPORT: String(db.port), PGUSER: "postgres", PGDATABASE: "postgres" },
  }).toString();
  const m = JSON.parse(out.trim().split("\n").pop());
  add(3, "gateway Node script (pg, row by row)", m.encrypted, m.seconds);
  const call = results.find((r) => r.name === "CALL encrypt_provider_keys(verbose => false)");
  results.push({ group: 3, name: "CALL encrypt_provider_keys(verbose => false)", rows: call.rows, secs: call.secs, rps: call.rps, baseline: "gateway Node script (pg, row by row)" });
}

// 5. the guard: token writes with the guard installed, against the same writes without it, on
// fresh copies of the same rows. The two of a pair are timed in turns (A B A B A B, best of
// each), so that a change in the machine's load hits both alike.
{
  const guardOn = (t) => `CREATE TRIGGER provider_keys_encrypt_guard BEFORE INSERT OR UPDATE OF id, token, status ON ${t}
                          FOR EACH ROW EXECUTE FUNCTION provider_keys_encrypt_guard()`;
  const guarded = () => { fresh(); db.psql(guardOn("provider_key")); };
  const inTurns = (a, b) => {
    const best = [Infinity, Infinity];
    for (let r = 0; r < REPEAT; r++) [a, b].forEach((f, i) => { best[i] = Math.min(best[i], f()); });
    return best;
  };
  const pair = (what, sql, note, rows = active) => {
    const base = `${what} — no guard`;
    const [plain, withGuard] = inTurns(() => timeCall(sql, fresh, 1), () => timeCall(sql, guarded, 1));
    add(5, base, rows, plain);
    add(5, `${what} — guard (${note})`, rows, withGuard, base);
  };
  // a set-based UPDATE writing plaintext: the guard encrypts every row
  pair("UPDATE … SET token = <plaintext>", "UPDATE provider_key SET token = 'sk-proj-' || md5(id) || md5(token) WHERE status IS DISTINCT FROM 'deleted'",
       "encrypts each");
  // writing tokens made elsewhere (the new gateway's): the guard opens each one
  pair("UPDATE … SET token = <token made elsewhere>", "UPDATE provider_key p SET token = e.token FROM enc e WHERE e.id = p.id AND p.status IS DISTINCT FROM 'deleted'",
       "opens each");
  // the engine's own writes: tokens this backend has just sealed are not opened again
  pair("UPDATE … SET token = encrypt_token(token)", "UPDATE provider_key SET token = encrypt_token(token) WHERE status IS DISTINCT FROM 'deleted'",
       "just sealed: not opened again");
  // the CALL that installs the guard first, against the CALL without it
  {
    const [plain, withGuard] = inTurns(() => timeCall("CALL encrypt_provider_keys(verbose => false)", fresh, 1),
                                       () => timeCall("CALL encrypt_provider_keys(guard => true, verbose => false)", fresh, 1));
    add(5, "CALL encrypt_provider_keys(verbose => false)", active, plain);
    add(5, "CALL encrypt_provider_keys(guard => true, verbose => false)", active, withGuard, "CALL encrypt_provider_keys(verbose => false)");
  }

  // single-row INSERTs of plaintext from clients: pgbench, 4 connections, extended protocol
  // (as node-postgres sends them), one autocommit INSERT per transaction
  const clients = 4, perClient = smoke ? 50 : 25_000;
  const script = join(db.dir, "insert.pgbench");
  writeFileSync(script, "INSERT INTO ins (id, token, provider) VALUES ('ins-' || nextval('ins_seq'), 'sk-proj-' || md5(random()::text) || md5(random()::text), 'openai');\n");
  const inserts = (guard) => {
    db.script(`SET client_min_messages = warning; DROP TABLE IF EXISTS ins; DROP SEQUENCE IF EXISTS ins_seq;
      CREATE TABLE ins (LIKE src INCLUDING ALL); CREATE SEQUENCE ins_seq; ${guard ? guardOn("ins") + ";" : ""} CHECKPOINT;`);
    const out = execFileSync(`${process.env.PKE_PG_BIN}/pgbench`, ["-n", "-M", "extended", "-c", String(clients), "-j", "2",
      "-t", String(perClient), "-f", script, "-h", db.dir, "-p", String(db.port), "-U", "postgres", "postgres"]).toString();
    const tps = Number((out.match(/tps = ([\d.]+)/) ?? [])[1]);
    if (!(tps > 0)) throw new Error(out);
    if (guard && db.psql("SELECT count(*) FROM ins WHERE pke_internal.token_state(token) <> 'current_key'") !== "0") {
      throw new Error("the guard let a plaintext INSERT through");
    }
    return (clients * perClient) / tps;
  };
  const [plainIns, guardIns] = inTurns(() => inserts(false), () => inserts(true));
  const plain = "single-row INSERT of a plaintext key, 4 clients (pgbench) — no guard";
  add(5, plain, clients * perClient, plainIns);
  add(5, "single-row INSERT of a plaintext key, 4 clients (pgbench) — guard (encrypts each)", clients * perClient, guardIns, plain);
}

// 6. format llmgw, the gateway's backfill: the CALL against a bare set-based UPDATE computing
// the same four columns with the same functions, and against the gateway's own backfill (a
// Node script with pg: batches of 100 rows, one UPDATE per row), all on the same rows
const LLMGW_BARE = "bare UPDATE … SET token = NULL, token_ciphertext/hash/masked = llmgw_…(token)";
const LLMGW_CALL = "CALL encrypt_provider_keys(format => 'llmgw', verbose => false)";
const LLMGW_NODE = "gateway backfill script (pg, batches of 100, one UPDATE per row)";
{
  const freshGw = () => makeGatewayTable("gw_key", "src");
  add(6, LLMGW_BARE, N, timeCall(`UPDATE gw_key SET token = NULL,
      token_ciphertext = llmgw_encrypt_token(token, id, organization_id),
      token_hash = llmgw_token_hash(token), token_masked = llmgw_mask_token(token)
    WHERE token IS NOT NULL AND token_ciphertext IS NULL`, freshGw));
  add(6, LLMGW_CALL, N, timeCall("CALL encrypt_provider_keys('gw_key', format => 'llmgw', verbose => false)", freshGw), LLMGW_BARE);
  add(6, "CALL … format => 'llmgw' — 2nd run (all skipped)", N,
    timeCall("CALL encrypt_provider_keys('gw_key', format => 'llmgw', verbose => false)", () => {}), LLMGW_BARE);
  makeGatewayTable("gw_key", "gw_src");
  const out = execFileSync("node", [new URL("./gateway_backfill.mjs", import.meta.url).pathname], {
    env: { ...process.env, GATEWAY_API_KEY_HASH_SECRET: GATEWAY_SECRET, PKE_TABLE: "gw_key",
           PGHOST: db.dir, PGPORT: String(db.port), PGUSER: "postgres", PGDATABASE: "postgres" },
  }).toString();
  const m = JSON.parse(out.trim().split("\n").pop());
  if (m.moved !== NODE_N) throw new Error(`the gateway backfill moved ${m.moved} of ${NODE_N} rows`);
  add(6, LLMGW_NODE, m.moved, m.seconds);
  const call = results.find((r) => r.name === LLMGW_CALL);
  results.push({ ...call, baseline: LLMGW_NODE });
}

// 4. peak private memory of the backend running the CALL, sampled every 20 ms
const memory = [];
const MEM_RUNS = [
  ["CALL encrypt_provider_keys(verbose => false)", (size) => makeData("provider_key", size),
   "CALL encrypt_provider_keys(verbose => false, batch_size => 1000)"],
  [LLMGW_CALL, (size) => { makeData("mem_src", size); makeGatewayTable("provider_key", "mem_src"); },
   "CALL encrypt_provider_keys(format => 'llmgw', verbose => false, batch_size => 1000)"],
];
for (const [label, prepare, sql] of MEM_RUNS) for (const size of MEM_SIZES) {
  prepare(size);
  const run = db.background(sql, { appName: "pke_mem" });
  let pid = 0, peak = 0, base = 0;
  while (true) {
    const done = await Promise.race([run.done.then(() => true), new Promise((r) => setTimeout(() => r(false), 20))]);
    if (!pid) pid = Number(db.psql("SELECT coalesce(max(pid), 0) FROM pg_stat_activity WHERE application_name = 'pke_mem'"));
    // the backend may exit between any two looks (a smoke-sized CALL ends in milliseconds):
    // a status file that is gone means no more samples, never an error
    let status = null;
    if (pid) { try { status = readFileSync(`/proc/${pid}/status`, "utf8"); } catch (e) { if (e.code !== "ENOENT" && e.code !== "ESRCH") throw e; } }
    if (status) {
      const anon = Number((status.match(/RssAnon:\s+(\d+)/) ?? [0, 0])[1]);
      if (!base) base = anon;
      peak = Math.max(peak, anon);
    }
    if (done) break;
  }
  const r = await run.done;
  if (!/errors=0/.test(r.err)) throw new Error(r.err.slice(-500));
  memory.push({ label, rows: size, peakKb: peak, startKb: base });
}

// report
const fmt = (x, d = 0) => x.toLocaleString("en", { maximumFractionDigits: d, minimumFractionDigits: d });
const lines = [];
lines.push(`Machine: ${os.cpus().length} × ${os.cpus()[0].model.trim()}, ${fmt(os.totalmem() / 2 ** 30)} GiB; ` +
  `${db.psql("SELECT version()").split(" on ")[0]}; ${new Date().toISOString().slice(0, 10)}; ${fmt(N)} rows` +
  `${smoke ? " (smoke sizes: not meaningful)" : ""}; load average ${fmt(loadAtStart, 1)} at the start, ${fmt(os.loadavg()[0], 1)} at the end.`, "");
lines.push("| # | what | rows | seconds | rows/s | ratio | vs |", "|---|---|---:|---:|---:|---:|---|");
for (const r of results) {
  const base = r.baseline && results.find((b) => b.name === r.baseline && b.group === r.group) ;
  const ratio = base ? r.rps / base.rps : null;
  lines.push(`| ${r.group} | ${r.name} | ${fmt(r.rows)} | ${fmt(r.secs, 2)} | ${fmt(r.rps)} | ${ratio ? fmt(ratio, 2) + "×" : ""} | ${r.baseline ?? ""} |`);
}
lines.push("", "| 4 | peak private memory (RssAnon) of the backend running the CALL | rows | at start | peak |", "|---|---|---:|---:|---:|");
for (const m of memory) lines.push(`| 4 | ${m.label} | ${fmt(m.rows)} | ${fmt(m.startKb / 1024, 1)} MiB | ${fmt(m.peakKb / 1024, 1)} MiB |`);
const report = lines.join("\n");
console.log(report);
if (jsonArg >= 0) {
  writeFileSync(argv[jsonArg + 1], JSON.stringify({ version: db.psql("SELECT version()"), rows: N, results, memory }, null, 1));
}
if (record) {
  const path = new URL("../BENCHMARKS.md", import.meta.url).pathname;
  const doc = readFileSync(path, "utf8");
  const marker = "<!-- results -->";
  const i = doc.indexOf(marker);
  writeFileSync(path, doc.slice(0, i + marker.length) + "\n" + report + "\n");
  console.log(`\nrecorded in ${path}`);
}
