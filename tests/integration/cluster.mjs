// A throwaway PostgreSQL cluster for integration tests: initdb + pg_ctl as the `postgres`
// user when we are root (PostgreSQL refuses to run as root), a Unix socket in the data
// directory's parent, the extension (installed by `cargo pgrx test/regress`) preloaded (as the
// README requires; `preload: false` to see what happens without) and created in database
// `postgres`. Only loopback/Unix sockets: listen_addresses is empty. The server's environment
// is exactly `env`: no key is inherited from the test runner.
// The runner's environment says which PostgreSQL, where and which key; scripts/lib.sh sets it (run these
// tests through scripts/test, or source scripts/lib.sh first):
//   PKE_PG_BIN       bin directory of the private PostgreSQL installation that holds the extension
//   PKE_WORK         work directory; clusters live in $PKE_WORK/it/<name>
//   PKE_TEST_KEY     the test key
//   PKE_PORT_OFFSET  added to every cluster's port (default 0)
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { mkdirSync, rmSync, chownSync, appendFileSync, readFileSync, existsSync } from "node:fs";
import { join } from "node:path";

// a placeholder setting Cluster.reload() writes to postgresql.conf
export const RELOAD_MARKER = "pke_test.reload_marker";

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run the tests through scripts/test, or \`source scripts/lib.sh\` first`);
  return v;
}
const PG_BIN = env("PKE_PG_BIN");
const WORK = env("PKE_WORK");
const PORT_OFFSET = Number(process.env.PKE_PORT_OFFSET ?? 0);
const isRoot = process.getuid() === 0;
const pgUid = isRoot ? Number(execFileSync("id", ["-u", "postgres"]).toString().trim()) : null;
const pgGid = isRoot ? Number(execFileSync("id", ["-g", "postgres"]).toString().trim()) : null;

function asPg(cmd, args, opts = {}) {
  return isRoot ? ["runuser", ["-u", "postgres", "--", cmd, ...args], opts] : [cmd, args, opts];
}

export const TEST_KEY = env("PKE_TEST_KEY");
// The variables the extension reads its keys from: never inherited by a test server.
export const KEY_VARS = ["ENCRYPTION_KEY", "ENCRYPTION_KEY_PREVIOUS", "GATEWAY_API_KEY_HASH_SECRET"];

export class Cluster {
  constructor(name, { port, env = {}, conf = [], preload = true, createExtension = true } = {}) {
    this.dir = join(WORK, "it", name);
    this.data = join(this.dir, "data");
    this.port = port + PORT_OFFSET;
    this.env = env;
    this.conf = preload ? ["shared_preload_libraries = 'provider_keys_encrypt'", ...conf] : conf;
    this.createExtension = createExtension;
  }

  start() {
    this.stop();
    rmSync(this.dir, { recursive: true, force: true });
    mkdirSync(this.dir, { recursive: true });
    if (isRoot) chownSync(this.dir, pgUid, pgGid);
    const [c, a] = asPg(`${PG_BIN}/initdb`, ["-D", this.data, "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8"]);
    execFileSync(c, a, { stdio: "ignore" });
    appendFileSync(join(this.data, "postgresql.conf"),
      [`port = ${this.port}`, `unix_socket_directories = '${this.dir}'`, "listen_addresses = ''",
       "fsync = off", ...this.conf].join("\n") + "\n");
    this.pgctl(["-l", join(this.dir, "server.log"), "-w", "start"]);
    if (this.createExtension) this.psql("CREATE EXTENSION provider_keys_encrypt");
    return this;
  }

  // Stop and start again on the same data, with a new environment if given (keys are read
  // from the environment only, so changing a key means a restart, as in production) and
  // extra server options (`-o`, e.g. "-c name=value").
  restart({ env, options } = {}) {
    this.stop();
    if (env) this.env = env;
    this.pgctl(["-l", join(this.dir, "server.log"), "-w", ...(options ? ["-o", options] : []), "start"]);
    return this;
  }

  // Append lines to postgresql.conf (takes effect at the next reload or restart).
  appendConf(lines) { appendFileSync(join(this.data, "postgresql.conf"), lines.join("\n") + "\n"); }

  // pg_reload_conf(), returning once the reload is done: when a new session sees the marker
  // written with it. The postmaster reads the files (and logs what it refuses) before it forks
  // that session; pg_reload_conf() itself only sends a signal, and a "received SIGHUP" line in
  // the log comes before what the reload then logs.
  reload() {
    const marker = `m${Date.now()}${Math.random().toString(16).slice(2)}`;
    this.appendConf([`${RELOAD_MARKER} = '${marker}'`]);
    this.psql("SELECT pg_reload_conf()");
    for (let i = 0; this.psql(`SELECT current_setting('${RELOAD_MARKER}', true)`) !== marker; i++) {
      if (i > 1500) throw new Error("the server did not reload its configuration within 30 s");
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20);
    }
  }

  pgctl(args) {
    const [c, a] = asPg(`${PG_BIN}/pg_ctl`, ["-D", this.data, ...args]);
    // the server's environment is exactly what the test asks for: never an inherited key
    const env = { ...process.env };
    for (const v of KEY_VARS) delete env[v];
    // `env` values are strings (UTF-8); a value given as a Buffer reaches the server as those
    // exact bytes (e.g. not UTF-8), through bash's printf
    const raw = Object.entries(this.env).filter(([, v]) => Buffer.isBuffer(v));
    const text = Object.fromEntries(Object.entries(this.env).filter(([, v]) => !Buffer.isBuffer(v)));
    if (raw.length === 0) return execFileSync(c, a, { stdio: "ignore", env: { ...env, ...text } });
    const exports = raw.map(([k, v]) => `export ${k}="$(printf '${[...v].map((b) => "\\x" + b.toString(16).padStart(2, "0")).join("")}')"`).join("; ");
    execFileSync("bash", ["-c", `${exports}; exec "$@"`, "bash", c, ...a], { stdio: "ignore", env: { ...env, ...text } });
  }

  stop(mode = "fast") {
    if (existsSync(join(this.data, "postmaster.pid"))) {
      try { this.pgctl(["-m", mode, "-w", "stop"]); } catch { /* already gone */ }
    }
  }

  log() { return existsSync(join(this.dir, "server.log")) ? readFileSync(join(this.dir, "server.log"), "utf8") : ""; }

  args(user = "postgres") {
    return ["-X", "-q", "-h", this.dir, "-p", String(this.port), "-U", user, "-d", "postgres", "-v", "ON_ERROR_STOP=1"];
  }

  // Run SQL; returns { out, err, status }. Throws on failure unless allowFail.
  run(sql, { user, input, allowFail = false, tuples = true, verbose = false, env } = {}) {
    const a = [...this.args(user), ...(tuples ? ["-At"] : []), ...(verbose ? ["-v", "VERBOSITY=verbose"] : []), "-c", sql];
    const r = spawnSync(`${PG_BIN}/psql`, a, { input, encoding: "utf8", maxBuffer: 1 << 30, env: env ? { ...process.env, ...env } : process.env });
    if (r.status !== 0 && !allowFail) throw new Error(`psql failed (${r.status}): ${r.stderr}\nSQL: ${sql.slice(0, 300)}`);
    return { out: r.stdout, err: r.stderr, status: r.status };
  }

  psql(sql, opts) { return this.run(sql, opts).out.trim(); }

  // Run a script without stopping at errors; never throws. Returns { out, err, status }.
  probe(sql, { user, env } = {}) {
    const a = ["-X", "-q", "-At", "-h", this.dir, "-p", String(this.port), "-U", user ?? "postgres", "-d", "postgres", "-f", "-"];
    const r = spawnSync(`${PG_BIN}/psql`, a, { input: sql, encoding: "utf8", env: { ...process.env, ...env } });
    return { out: r.stdout ?? "", err: r.stderr ?? "", status: r.status };
  }

  // Run a multi-statement script through stdin: each statement in its own transaction.
  script(sql, { user } = {}) {
    const r = spawnSync(`${PG_BIN}/psql`, [...this.args(user), "-At", "-f", "-"], { input: sql, encoding: "utf8", maxBuffer: 1 << 30 });
    if (r.status !== 0) throw new Error(`psql script failed (${r.status}): ${r.stderr}`);
    return r.stdout.trim();
  }

  // A psql session in the background (for concurrency); resolves with its output.
  // (One statement per call: psql -c "a; b" is one implicit transaction, so a CALL in it is
  // atomic and never commits. Name the session with appName instead of SET application_name.)
  background(sql, { user, appName } = {}) {
    const env = appName ? { ...process.env, PGAPPNAME: appName } : process.env;
    const child = spawn(`${PG_BIN}/psql`, [...this.args(user), "-At", "-c", sql], { stdio: ["ignore", "pipe", "pipe"], env });
    let out = "", err = "";
    child.stdout.on("data", (d) => (out += d));
    child.stderr.on("data", (d) => (err += d));
    const done = new Promise((resolve) => child.on("close", (status) => resolve({ out, err, status })));
    return { child, done };
  }

  // An interactive psql session kept open (so its last statement stays in pg_stat_activity, a
  // transaction can stay open, a session's settings persist). `await s.send(sql)` runs one
  // line and resolves with what it printed ({ out, err }); `await s.close()`. `env` goes to
  // psql (e.g. PGOPTIONS); if the connection fails, send() resolves with its error.
  session({ user, env } = {}) {
    const child = spawn(`${PG_BIN}/psql`, ["-X", "-q", "-h", this.dir, "-p", String(this.port), "-U", user ?? "postgres", "-d", "postgres", "-At", "-v", "VERBOSITY=verbose"],
      { stdio: ["pipe", "pipe", "pipe"], env: { ...process.env, ...env } });
    let out = "", err = "", closed = false, n = 0, waiters = [];
    const poke = () => { for (const w of waiters) w(); };
    child.stdout.on("data", (d) => { out += d; poke(); });
    child.stderr.on("data", (d) => { err += d; poke(); });
    const done = new Promise((resolve) => child.on("close", () => { closed = true; poke(); resolve(); }));
    child.stdin.on("error", () => {});
    return {
      send(sql) {
        const mark = `@@done${++n}@@`;
        const o0 = out.length, e0 = err.length;
        if (!closed) child.stdin.write(`${sql}\n\\echo ${mark}\n\\warn ${mark}\n`);
        return new Promise((resolve) => {
          const check = () => {
            if (closed || (out.includes(mark, o0) && err.includes(mark, e0))) {
              waiters = waiters.filter((w) => w !== check);
              const strip = (t) => t.split(mark).join("").trim();
              resolve({ out: strip(out.slice(o0)), err: strip(err.slice(e0)), closed });
            }
          };
          waiters.push(check);
          check();
        });
      },
      async close() { if (!closed) child.stdin.end("\\q\n"); await done; },
    };
  }

  // Load rows of JSON documents into a one-column jsonb table (any text survives untouched).
  loadJson(table, docs) {
    this.psql(`CREATE TABLE ${table} (doc jsonb)`);
    const body = docs.map((d) => JSON.stringify(d)).join("\n") + "\n";
    this.run(`COPY ${table} (doc) FROM STDIN WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')`, { input: body });
  }

  // Read a query of one json column back as objects.
  readJson(query) {
    const out = this.run(`COPY (${query}) TO STDOUT WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')`).out;
    return out.split("\n").filter(Boolean).map((l) => JSON.parse(l));
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
