// Every way to give a key (the key command included), with and without preloading, against
// every observer: a plain role,
// a pg_read_all_settings member, a pg_monitor member, and the server log under default logging
// settings (reloads included). The tables this prints are docs/security.md's "Every way to give
// a key, and who can see it": the test renders them from what it observed and requires the
// document to say exactly that. It also asserts the policy outright (below), so an edit of the
// document cannot make a leak pass.
//
// Each attempt uses fresh values (valid keys, or gateway secrets), one per setting, so a value
// seen anywhere is attributed to the path that gave it. The environment's own keys must never
// be seen by any observer, in any step.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import { readFileSync, writeFileSync, chownSync } from "node:fs";
import { join } from "node:path";
import { execFileSync } from "node:child_process";
import { Cluster, RELOAD_MARKER } from "./cluster.mjs";

const major = Number(execFileSync(`${process.env.PKE_PG_BIN}/pg_config`, ["--version"]).toString().match(/PostgreSQL (\d+)/)[1]);

const SETTINGS = [
  ["provider_keys_encrypt.encryption_key", "key"],
  ["provider_keys_encrypt.previous_keys", "key"],
  ["provider_keys_encrypt.gateway_api_key_hash_secret", "secret"],
];
const freshKey = () => randomBytes(32).toString("base64");
const freshSecret = () => "gw-secret-" + randomBytes(12).toString("hex");
const fresh = () => SETTINGS.map(([, kind]) => (kind === "key" ? freshKey() : freshSecret()));

const ENV = {
  ENCRYPTION_KEY: freshKey(),
  ENCRYPTION_KEY_PREVIOUS: `${freshKey()},${freshKey()}`,
  GATEWAY_API_KEY_HASH_SECRET: `${freshSecret()},${freshSecret()}`,
};
const ENV_SECRETS = [ENV.ENCRYPTION_KEY, ...ENV.ENCRYPTION_KEY_PREVIOUS.split(","), ...ENV.GATEWAY_API_KEY_HASH_SECRET.split(",")];
const ENV_FINGERPRINT = createHmac("sha256", Buffer.from(ENV.ENCRYPTION_KEY, "base64"))
  .update("provider_keys_encrypt key fingerprint v1").digest("hex").slice(0, 16);

const OBSERVERS = [["plain role", "plain"], ["pg_read_all_settings", "settings"], ["pg_monitor", "monitor"]];
// What each observer tries, grouped by where a value could show up. No extension function is
// called: a session that has not loaded the library is the worst case without preloading.
const PROBES = [
  ["SHOW", SETTINGS.map(([n]) => `SHOW ${n};\nSELECT current_setting('${n}', true);`).join("\n")],
  ["pg_settings", "SELECT name, setting, reset_val, boot_val FROM pg_settings WHERE name LIKE 'provider_keys_encrypt%';"],
  ["pg_db_role_setting", "SELECT setconfig::text FROM pg_db_role_setting;"],
  ["pg_proc", "SELECT proconfig::text FROM pg_proc WHERE proconfig IS NOT NULL;"],
  ["pg_stat_activity", "SELECT query FROM pg_stat_activity;"],
  ["pg_file_settings", "SELECT name, setting FROM pg_file_settings;"],
];

// "ok", or the SQLSTATE of the first ERROR/FATAL (psql prints it with VERBOSITY=verbose). A
// failed connection's message has no SQLSTATE: the check hook's message, the only one that
// says "cannot be set: provider_keys_encrypt reads keys only…", is always raised as 55P02
// (src/pg_tests.rs checks it for every SQL path).
const state = (text) => {
  const m = /(ERROR|FATAL):\s+([0-9A-Z]{5}):/.exec(text);
  if (m) return m[1] === "FATAL" ? `FATAL ${m[2]}` : m[2];
  if (/FATAL: {2}provider_keys_encrypt\.\w+ cannot be set: provider_keys_encrypt reads keys only/.test(text)) return "FATAL 55P02";
  if (/FATAL:/.test(text)) return "FATAL";
  return "ok";
};

function observe(c, values) {
  const seen = {};
  for (const [, role] of OBSERVERS) {
    seen[role] = [];
    for (const [where, sql] of PROBES) {
      const r = c.probe(sql, { user: role });
      if (values.some((v) => r.out.includes(v) || r.err.includes(v))) seen[role].push(where);
      assert.ok(!ENV_SECRETS.some((v) => r.out.includes(v) || r.err.includes(v)),
        `${role} must never see the environment's keys (${where})`);
    }
  }
  return seen;
}

function logLeaks(text, values) {
  const kinds = new Set();
  for (const line of text.split("\n")) {
    assert.ok(!ENV_SECRETS.some((v) => line.includes(v)), `the environment's keys never reach the log: ${line.slice(0, 120)}`);
    if (!values.some((v) => line.includes(v))) continue;
    if (/ STATEMENT: {2}/.test(line)) kinds.add("STATEMENT line");
    else if (/ LOG: {2}parameter ".*" changed to "/.test(line)) kinds.add('reload: "changed to"');
    else kinds.add(`OTHER: ${line.replace(/^\S+ \S+ \S+ \[\d+\] /, "").slice(0, 60)}`);
  }
  return [...kinds];
}

// Use the extension in a fresh superuser session: "ok" (with the environment's fingerprint)
// or the SQLSTATE it refuses with, and the message.
function use(c, fingerprint = ENV_FINGERPRINT) {
  const r = c.run("SELECT provider_keys_encrypt_fingerprint()", { allowFail: true, verbose: true });
  const s = state(r.err);
  if (s === "ok") assert.equal(r.out.trim(), fingerprint);
  return { state: s, err: r.err };
}
const fingerprintOf = (key) => createHmac("sha256", Buffer.from(key, "base64"))
  .update("provider_keys_encrypt key fingerprint v1").digest("hex").slice(0, 16);

const confPath = (c) => join(c.data, "postgresql.conf");
function setConfLines(c, lines) {
  const kept = readFileSync(confPath(c), "utf8").split("\n")
    .filter((l) => !l.startsWith("provider_keys_encrypt.") && !l.startsWith(RELOAD_MARKER));
  writeFileSync(confPath(c), [...kept.filter(Boolean), ...lines].join("\n") + "\n");
}

// One session per setting, each giving its value in one statement and kept open (its last
// statement stays in pg_stat_activity) until the observers have looked.
function sqlPath(label, okLabel, statement, { before, cleanup } = {}) {
  return {
    label, okLabel, sqlText: true,
    async give(c, values) {
      const sessions = [], given = [];
      for (const [i, [name]] of SETTINGS.entries()) {
        const s = c.session();
        if (before) await s.send(before);
        given.push(state((await s.send(statement(name, values[i], i))).err));
        sessions.push(s);
      }
      return { given, sessions };
    },
    cleanup,
  };
}

const PATHS = [
  {
    label: "the server's environment (`ENCRYPTION_KEY`, `ENCRYPTION_KEY_PREVIOUS`, `GATEWAY_API_KEY_HASH_SECRET`)",
    okLabel: "read at first use", env: true,
    async give() { return { given: ["ok"], sessions: [] }; },
  },
  sqlPath("`SET`", "kept as a placeholder", (n, v) => `SET ${n} = '${v}';`),
  sqlPath("`SET LOCAL`", "kept as a placeholder", (n, v) => `SET LOCAL ${n} = '${v}';`, { before: "BEGIN;" }),
  sqlPath("`set_config()`", "kept as a placeholder", (n, v) => `SELECT set_config('${n}', '${v}', false);`),
  sqlPath("`ALTER SYSTEM`", "written to postgresql.auto.conf", (n, v) => `ALTER SYSTEM SET ${n} = '${v}';`,
    { cleanup: (c) => { c.probe(SETTINGS.map(([n]) => `ALTER SYSTEM RESET ${n};`).join("\n")); c.reload(); } }),
  sqlPath("`ALTER DATABASE … SET`", "stored in pg_db_role_setting", (n, v) => `ALTER DATABASE postgres SET ${n} = '${v}';`,
    { cleanup: (c) => c.probe(SETTINGS.map(([n]) => `ALTER DATABASE postgres RESET ${n};`).join("\n")) }),
  sqlPath("`ALTER ROLE … SET`", "stored in pg_db_role_setting", (n, v) => `ALTER ROLE app SET ${n} = '${v}';`,
    { cleanup: (c) => c.probe(SETTINGS.map(([n]) => `ALTER ROLE app RESET ${n};`).join("\n")) }),
  sqlPath("a function's `SET` clause", "stored in pg_proc", (n, v, i) => `CREATE FUNCTION keyed_${i}() RETURNS int LANGUAGE sql SET ${n} = '${v}' AS 'SELECT 1';`,
    { cleanup: (c) => c.probe(SETTINGS.map((_, i) => `DROP FUNCTION IF EXISTS keyed_${i}();`).join("\n")) }),
  {
    label: "`PGOPTIONS` (`-c` in the connection's options)", okLabel: "kept as a placeholder", sqlText: false,
    async give(c, values) {
      const sessions = [], given = [];
      for (const [i, [name]] of SETTINGS.entries()) {
        const s = c.session({ env: { PGOPTIONS: `-c ${name}=${values[i]}` } });
        given.push(state((await s.send("SELECT 1;")).err));
        sessions.push(s);
      }
      return { given, sessions };
    },
  },
  {
    label: "postgresql.conf (reloaded, changed and reloaded, restarted)", okLabel: "kept as a placeholder", sqlText: false,
    async give(c, values) {
      setConfLines(c, SETTINGS.map(([n], i) => `${n} = '${values[i]}'`));
      c.reload();
      const changed = fresh();
      values.push(...changed);
      const before = c.log();
      setConfLines(c, SETTINGS.map(([n], i) => `${n} = '${changed[i]}'`));
      c.reload();
      return { given: fileGiven(c, before), sessions: [], afterObserve: () => c.restart() };
    },
    cleanup(c) { setConfLines(c, []); c.restart(); },
  },
  {
    // the keys printed by a command the server runs (a file only its OS user can read), set in
    // postgresql.conf and reloaded: the command's text is in the configuration, its output nowhere
    label: "`provider_keys_encrypt.key_command` (a command that prints them; postgresql.conf, reloaded)",
    okLabel: "set in postgresql.conf", sqlText: false, keyCommand: true,
    async give(c, values) {
      const file = join(c.dir, "keys.env");
      const lines = ["ENCRYPTION_KEY", "ENCRYPTION_KEY_PREVIOUS", "GATEWAY_API_KEY_HASH_SECRET"].map((n, i) => `${n}=${values[i]}`);
      writeFileSync(file, lines.join("\n") + "\n", { mode: 0o600 });
      if (process.getuid() === 0) {
        const uid = Number(execFileSync("id", ["-u", "postgres"]).toString().trim());
        chownSync(file, uid, uid);
      }
      setConfLines(c, [`provider_keys_encrypt.key_command = 'cat ${file}'`]);
      c.reload();
      return { given: ["ok"], sessions: [] };
    },
    cleanup(c) { setConfLines(c, []); c.reload(); },
  },
  {
    label: "`-c` on the server's command line", okLabel: "kept as a placeholder", sqlText: false,
    async give(c, values) {
      const before = c.log();
      c.restart({ options: SETTINGS.map(([n], i) => `-c ${n}=${values[i]}`).join(" ") });
      return { given: fileGiven(c, before), sessions: [] };
    },
    cleanup(c) { c.restart(); },
  },
];

// A config file or command-line value is never a statement: the check hook's refusal (if the
// library is loaded) is only in the log.
function fileGiven(c, before) {
  return [c.log().slice(before.length).includes("cannot be set: provider_keys_encrypt reads keys only") ? "logged 55P02" : "ok"];
}

function givenText(path, given) {
  const texts = [...new Set(given)].map((g) =>
    g === "ok" ? path.okLabel
      : g === "logged 55P02" ? "refused (55P02, in the log)"
      : g.startsWith("FATAL ") ? `connection refused (${g.slice(6)})`
      : `refused (${g})`);
  return texts.join(" / ");
}

const cell = (list) => (list.length ? list.join(", ") : "—");

async function runMatrix(c) {
  c.script(`CREATE ROLE plain LOGIN; CREATE ROLE settings LOGIN IN ROLE pg_read_all_settings;
            CREATE ROLE monitor LOGIN IN ROLE pg_monitor; CREATE ROLE app LOGIN;`);
  const rows = [];
  for (const path of PATHS) {
    const values = path.env ? [...ENV_SECRETS] : fresh();
    const logStart = c.log().length;
    const { given, sessions, afterObserve } = await path.give(c, values);
    const seen = observe(c, values);
    for (const s of sessions) await s.close();
    if (afterObserve) {
      afterObserve();
      const again = observe(c, values);
      for (const k of Object.keys(seen)) seen[k] = [...new Set([...seen[k], ...again[k]])];
    }
    const used = use(c, path.keyCommand ? fingerprintOf(values[0]) : ENV_FINGERPRINT);
    if (path.cleanup) await path.cleanup(c);
    const afterCleanup = use(c);
    const log = logLeaks(c.log().slice(logStart), values);
    rows.push({ path, given, seen, used, afterCleanup, log });
  }
  return rows;
}

function render(rows) {
  const head = "| how the key is given | outcome | plain role | pg_read_all_settings | pg_monitor | server log |\n|---|---|---|---|---|---|";
  return [head, ...rows.map((r) => {
    const useText = r.used.state === "ok" ? "the functions work" : `the functions refuse (${r.used.state})`;
    return `| ${r.path.label} | ${givenText(r.path, r.given)}; ${useText} | ${cell(r.seen.plain)} | ${cell(r.seen.settings)} | ${cell(r.seen.monitor)} | ${cell(r.log)} |`;
  })].join("\n");
}

const tables = {};
const clusters = [];
after(() => {
  for (const c of clusters) c.stop();
  for (const [mode, t] of Object.entries(tables)) console.log(`# ${mode}\n${t.replace(/\n/g, "\n# ")}`);
  // PKE_KEY_SOURCES_OUT=file: write the document's blocks there, ready to paste
  if (process.env.PKE_KEY_SOURCES_OUT) {
    writeFileSync(process.env.PKE_KEY_SOURCES_OUT, Object.entries(tables)
      .map(([mode, t]) => `<!-- key-sources:${mode} -->\n${t}\n<!-- /key-sources -->\n`).join("\n"));
  }
});

test("preloaded (required): only the environment and the key command give keys, and no observer sees one", async () => {
  const c = new Cluster("key-sources-preloaded", { port: 54440, env: ENV }).start();
  clusters.push(c);
  const rows = await runMatrix(c);
  tables.preloaded = render(rows);
  for (const r of rows) {
    const what = r.path.label;
    assert.deepEqual(r.seen.plain, [], `${what}: a plain role sees nothing`);
    assert.deepEqual(r.seen.settings, [], `${what}: pg_read_all_settings sees nothing`);
    // the only leak left is PostgreSQL's own copy of a statement's text in pg_stat_activity;
    // the refusal's STATEMENT: line is kept out of the log (src/log_filter.rs)
    assert.deepEqual(r.seen.monitor, r.path.sqlText ? ["pg_stat_activity"] : [], `${what}: pg_monitor`);
    assert.deepEqual(r.log, [], `${what}: server log`);
    if (r.path.env) {
      assert.equal(r.used.state, "ok", "the environment's keys work");
    } else if (r.path.keyCommand) {
      assert.equal(r.used.state, "ok", "the key command's keys work (its fingerprint, checked in use())");
      assert.equal(r.afterCleanup.state, "ok", "without the command (a reload), the environment's keys again");
    } else {
      assert.ok(r.given.every((g) => g !== "ok"), `${what} is refused: ${r.given}`);
      assert.equal(r.afterCleanup.state, "ok", `${what}: works once removed`);
    }
  }
  // the gateway's keyring came from the environment too: its key ids, never its secrets
  assert.match(c.psql("SHOW provider_keys_encrypt.gateway_api_key_hash_secret"),
    /^from GATEWAY_API_KEY_HASH_SECRET, key ids [0-9a-f]{8}, [0-9a-f]{8}$/);
  assert.equal(c.psql("SELECT count(*) FROM provider_keys_encrypt_keys()"), "3");
  // a config-file or command-line key makes the functions refuse, naming where
  const conf = rows.find((r) => r.path.label.startsWith("postgresql.conf"));
  assert.equal(conf.used.state, "55P02");
  assert.match(conf.used.err, /set in a configuration file .*restart the server/s);
  const argv = rows.find((r) => r.path.label.startsWith("`-c`"));
  assert.match(argv.used.err, /set in the server's command line/);
});

test("pooled connections: DISCARD ALL and RESET ALL leave the environment's key working, revealing nothing", async () => {
  const c = clusters[0];
  const s = c.session();
  const before = await s.send("SELECT provider_keys_encrypt_fingerprint();");
  assert.equal(before.out, ENV_FINGERPRINT);
  for (const reset of ["DISCARD ALL;", "RESET ALL;"]) {
    assert.equal((await s.send(reset)).err, "");
    const after = await s.send(`SELECT provider_keys_encrypt_fingerprint(); SHOW provider_keys_encrypt.encryption_key;
      SELECT decrypt_token(encrypt_token('pooled'));`);
    assert.equal(after.err, "");
    assert.equal(after.out, `${ENV_FINGERPRINT}\nfrom ENCRYPTION_KEY, fingerprint ${ENV_FINGERPRINT}\npooled`);
    assert.ok(!ENV_SECRETS.some((v) => after.out.includes(v)));
  }
  await s.close();
});

test("not preloaded: every function refuses (F0000), and the leaks PostgreSQL makes before any library code runs", async () => {
  const c = new Cluster("key-sources-not-preloaded", { port: 54441, env: ENV, preload: false }).start();
  clusters.push(c);
  const rows = await runMatrix(c);
  tables.not_preloaded = render(rows);
  for (const r of rows) {
    assert.notEqual(r.used.state, "ok", `${r.path.label}: the functions refuse without preloading`);
    assert.ok(!r.log.some((k) => k.startsWith("OTHER")), `${r.path.label}: no log line of ours carries a value: ${r.log}`);
  }
  assert.match(rows.find((r) => r.path.env).used.err, /F0000: provider_keys_encrypt is not in shared_preload_libraries/);
});

test("a key stored while the library was not preloaded: found at first use, named, refused until removed", async () => {
  const c = clusters[1];
  const [value] = fresh();
  c.psql(`ALTER ROLE app SET provider_keys_encrypt.encryption_key = '${value}'`);
  c.psql(`CREATE FUNCTION keyed() RETURNS int LANGUAGE sql SET provider_keys_encrypt.encryption_key = '${value}' AS 'SELECT 1'`);
  c.appendConf(["shared_preload_libraries = 'provider_keys_encrypt'"]);
  c.restart();
  let r = use(c);
  assert.equal(r.state, "55P02");
  assert.match(r.err, /pg_db_role_setting, which every role can read \(ALTER ROLE app SET provider_keys_encrypt\.encryption_key\)/);
  assert.match(r.err, /ALTER ROLE app RESET provider_keys_encrypt\.encryption_key/);
  assert.ok(!r.err.includes(value));
  c.psql("ALTER ROLE app RESET provider_keys_encrypt.encryption_key");
  r = use(c);
  assert.equal(r.state, "55P02");
  assert.match(r.err, /the SET clause of function keyed\(\)/);
  c.psql("ALTER FUNCTION keyed() RESET provider_keys_encrypt.encryption_key");
  assert.equal(use(c).state, "ok");
  assert.ok(!c.log().split("\n").some((l) => l.includes(value) && !/ STATEMENT: {2}/.test(l)));
});

test("docs/security.md's tables are exactly what was observed", () => {
  const doc = readFileSync(new URL("../../docs/security.md", import.meta.url), "utf8");
  for (const mode of ["preloaded", "not_preloaded"]) {
    assert.ok(tables[mode], `the ${mode} matrix ran`);
    const m = new RegExp(`<!-- key-sources:${mode} -->\\n([\\s\\S]*?)\\n<!-- /key-sources -->`).exec(doc);
    assert.ok(m, `docs/security.md has the ${mode} table`);
    // The tables are PostgreSQL 15's; the document lists the rows a later major observes differently
    // (`<!-- key-sources:MODE:MAJOR -->`, from that major on), and they replace the rows they name.
    let want = m[1];
    for (const d of doc.matchAll(new RegExp(`<!-- key-sources:${mode}:(\\d+) -->\\n([\\s\\S]*?)\\n<!-- /key-sources -->`, "g"))) {
      if (major < Number(d[1])) continue;
      for (const row of d[2].split("\n")) {
        const label = row.split(" | ")[0];
        assert.ok(want.split("\n").some((l) => l.split(" | ")[0] === label), `docs/security.md's ${mode}:${d[1]} row ${label} replaces a row`);
        want = want.split("\n").map((l) => (l.split(" | ")[0] === label ? row : l)).join("\n");
      }
    }
    assert.equal(tables[mode], want, `docs/security.md's ${mode} table (PostgreSQL ${major}) is what the test observed`);
  }
});
