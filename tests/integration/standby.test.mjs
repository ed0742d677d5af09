// A migration script that connects to a replica by mistake: a real hot standby (pg_basebackup
// of a primary, streaming). Every run that writes is one ERROR (25006) before the first row,
// not a WARNING per row and a "completed"; a dry run and the report work there; the same
// CALL on the primary completes, and the standby then sees every key encrypted.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { appendFileSync, chownSync, mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { Cluster, TEST_KEY } from "./cluster.mjs";

const PG_BIN = process.env.PKE_PG_BIN;
const isRoot = process.getuid() === 0;

// A standby of `primary`: its data directory is a base backup with standby.signal (-R), its
// own port and socket directory; it starts like any other cluster.
class Standby extends Cluster {
  constructor(name, primary, opts) { super(name, { ...opts, createExtension: false }); this.primary = primary; }
  start() {
    this.stop();
    rmSync(this.dir, { recursive: true, force: true });
    mkdirSync(this.dir, { recursive: true });
    const backup = [`${PG_BIN}/pg_basebackup`, "-h", this.primary.dir, "-p", String(this.primary.port), "-U", "postgres",
                    "-D", this.data, "-R", "-X", "stream"];
    if (isRoot) {
      chownSync(this.dir, Number(execFileSync("id", ["-u", "postgres"])), Number(execFileSync("id", ["-g", "postgres"])));
      execFileSync("runuser", ["-u", "postgres", "--", ...backup], { stdio: "ignore" });
    } else {
      execFileSync(backup[0], backup.slice(1), { stdio: "ignore" });
    }
    appendFileSync(join(this.data, "postgresql.conf"),
      [`port = ${this.port}`, `unix_socket_directories = '${this.dir}'`, "hot_standby = on"].join("\n") + "\n");
    this.pgctl(["-l", join(this.dir, "server.log"), "-w", "start"]);
    return this;
  }
}

const env = { ENCRYPTION_KEY: TEST_KEY };
const primary = new Cluster("standby-primary", { port: 54452, env, conf: ["wal_level = replica", "max_wal_senders = 4"] });
const standby = new Standby("standby-replica", primary, { port: 54453, env });

before(() => {
  primary.start();
  primary.psql(`CREATE TABLE provider_key (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
                INSERT INTO provider_key SELECT 'k' || g, 'sk-standby-' || g, 'openai' FROM generate_series(1, 300) g;`);
  standby.start();
  // the standby has replayed the rows
  for (let i = 0; standby.psql("SELECT count(*) FROM provider_key") !== "300"; i++) {
    if (i > 1500) throw new Error("the standby did not catch up within 30 s");
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20);
  }
});
after(() => { standby.stop(); primary.stop(); });

test("on a hot standby every writing run is one ERROR 25006 before the first row", () => {
  assert.equal(standby.psql("SELECT pg_is_in_recovery()"), "t");
  for (const call of ["CALL encrypt_provider_keys()", "CALL decrypt_provider_keys()", "CALL reencrypt_provider_keys()",
                      "CALL encrypt_provider_keys(guard => true)", "CALL encrypt_provider_keys(batch_size => 10)"]) {
    const r = standby.run(call, { allowFail: true, verbose: true });
    assert.notEqual(r.status, 0, `${call} fails`);
    const errors = r.err.split("\n").filter((l) => l.startsWith("ERROR:"));
    assert.equal(errors.length, 1, `${call}: one ERROR\n${r.err}`);
    assert.match(errors[0], /^ERROR:  25006: cannot run the provider key .* on a hot standby/);
    assert.doesNotMatch(r.err, /WARNING/, `${call}: no per-row warning`);
    assert.doesNotMatch(r.err, /Starting provider key/, `${call}: nothing started`);
    assert.match(r.err, /HINT:  Connect to the primary server/);
  }
});

test("on a hot standby a dry run and the report work", () => {
  const dry = standby.run("CALL encrypt_provider_keys(dry_run => true, verbose => false)", { allowFail: true });
  assert.equal(dry.status, 0, dry.err);
  assert.match(dry.err, /dry run completed \(nothing was written\): total=300, encrypted=300/);
  assert.equal(standby.psql("SELECT keys FROM provider_keys_encryption_report() WHERE state = 'plaintext'"), "300");
});

test("the same CALL on the primary completes, verified, and the standby sees every key encrypted", () => {
  const r = primary.run("CALL encrypt_provider_keys(verbose => false)", { allowFail: true });
  assert.equal(r.status, 0, r.err);
  assert.match(r.err, /completed: total=300, encrypted=300, skipped=0, errors=0 \(verified: a scan of every row not soft-deleted after the last batch found none left to encrypt\)/);
  const lsn = primary.psql("SELECT pg_current_wal_lsn()");
  for (let i = 0; standby.psql(`SELECT pg_last_wal_replay_lsn() >= '${lsn}'::pg_lsn`) !== "t"; i++) {
    if (i > 1500) throw new Error("the standby did not replay the run within 30 s");
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20);
  }
  assert.equal(standby.psql("SELECT count(*) FROM provider_key WHERE is_encrypted_token(token)"), "300");
});

