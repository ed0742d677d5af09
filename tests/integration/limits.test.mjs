// Bounded inputs at the SQL level: values over the limits are 54000, and a buffer sized by the
// input that cannot be allocated is 53200 from the extension (LOCATION errors.rs), never an
// abort that would take the cluster through crash recovery.
//
// How the allocation is made to fail, deterministically: the server runs with glibc's
// mmap_threshold at 64 KiB, so every allocation of 64 KiB or more is a fresh mmap; the
// backend's address-space limit (prlimit, as the postgres user: same uid) is then lowered to
// exactly its current size. The statement's input is a constant already in a cached plan
// (PREPARE, executed once before the limit), so PostgreSQL itself needs no large allocation:
// the first one is the extension's buffer for the 64 KiB plaintext (or token).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { Cluster, TEST_KEY } from "./cluster.mjs";

const major = Number(execFileSync(`${process.env.PKE_PG_BIN}/pg_config`, ["--version"]).toString().match(/PostgreSQL (\d+)/)[1]);
// The expected refusal. From PostgreSQL 16 on (measured on 16.2, 17.10, 18.6), executing the
// prepared decrypt_token call first copies its 87 KB token constant in the portal's memory, so
// there PostgreSQL's own allocation fails first: also 53200, also survivable, but from mcxt.c.
const OOM = {
  enc: /^ERROR: {2}53200: out of memory\nLOCATION: {2}provider_keys_encrypt, errors\.rs:\d+$/,
  dec: major >= 16
    ? /^ERROR: {2}53200: out of memory\n(DETAIL: {2}Failed on request of size \d+ in memory context "PortalContext"\.\nLOCATION: {2}MemoryContextAllocationFailure, mcxt\.c:\d+|LOCATION: {2}provider_keys_encrypt, errors\.rs:\d+)$/
    : /^ERROR: {2}53200: out of memory\nLOCATION: {2}provider_keys_encrypt, errors\.rs:\d+$/,
};

const db = new Cluster("limits", { port: 54443,
  env: { ENCRYPTION_KEY: TEST_KEY, GLIBC_TUNABLES: "glibc.malloc.mmap_threshold=65536" } });
before(() => db.start());
after(() => db.stop());

test("over the limits: 54000 (plaintext over 64 KiB, a value longer than any token)", () => {
  for (const [sql, want] of [
    ["SELECT encrypt_token(repeat('x', 65537))", "54000"],
    ["SELECT decrypt_token(repeat('A', 87424))", "54000"],
    ["SELECT is_encrypted_token(repeat('A', 87424))", null],
  ]) {
    const r = db.run(sql, { allowFail: true, verbose: true });
    if (want) assert.match(r.err, new RegExp(`ERROR:  ${want}: `), sql);
    else assert.equal(r.status, 0, `${sql}: ${r.err}`);
  }
  assert.equal(db.psql("SELECT length(encrypt_token(repeat('x', 65536)))"), "87420");
});

function limitAddressSpace(pid, bytes) {
  const args = ["--pid", String(pid), `--as=${bytes}:unlimited`];
  if (process.getuid() === 0) execFileSync("runuser", ["-u", "postgres", "--", "prlimit", ...args]);
  else execFileSync("prlimit", args);
}

test("out of memory in the extension's own buffers: 53200, and the backend lives on", async () => {
  const s = db.session();
  // a failed assertion must not leave the session open: node would wait for it forever
  try {
    const pid = Number((await s.send("SELECT pg_backend_pid();")).out);
    await s.send("SELECT encrypt_token(repeat('y', 65536)) AS tok \\gset");
    await s.send("PREPARE enc AS SELECT length(encrypt_token(repeat('x', 65536)));");
    await s.send("PREPARE dec AS SELECT length(decrypt_token(:'tok'));");
    for (const q of ["enc", "dec"]) {
      assert.deepEqual(await s.send(`EXECUTE ${q};`), { out: q === "enc" ? "87420" : "65536", err: "", closed: false });
      const vm = Number(/VmSize:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))[1]) * 1024;
      limitAddressSpace(pid, vm);
      const r = await s.send(`EXECUTE ${q};`);
      limitAddressSpace(pid, "unlimited");
      assert.match(r.err, OOM[q], `${q}: ${r.err}`);
      // the same backend goes on working once memory is back
      assert.equal((await s.send(`EXECUTE ${q};`)).out, q === "enc" ? "87420" : "65536");
    }
  } finally {
    await s.close();
  }
  assert.ok(!/terminated by signal|server process .* was terminated/.test(db.log()));
});
