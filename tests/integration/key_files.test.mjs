// `<VAR>_FILE`: each key variable's value from a file (Docker and Kubernetes secrets, the
// official image's convention). A real server is started with each variant of the file:
//   the right value (for all three variables), read by the postmaster once: a backend of a
//   server whose file has changed since it started still uses what the server read;
//   a missing file (58P01), a file the server cannot read (58030), a file others can read or its
//   group write, or owned by another user (F0000), an empty file or a relative path (22023), and
//   both VAR and VAR_FILE set (42710).
// Each refusal: every function that needs that key raises it, SHOW says it, the server log has
// one WARNING at start, and no byte of the file appears anywhere a role or the log can see.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import { writeFileSync, chmodSync, chownSync, mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { execFileSync } from "node:child_process";
import { Cluster } from "./cluster.mjs";
import { decrypt, encrypt } from "../interop/gateway.mjs";

const WORK = process.env.PKE_WORK;
const dir = join(WORK, "it", "key-files-secrets");
const isRoot = process.getuid() === 0;
const pgId = (flag) => Number(execFileSync("id", [flag, "postgres"]).toString().trim());

const KEY = randomBytes(32).toString("base64");
const PREV = randomBytes(32).toString("base64");
const SECRET = "gw-file-secret-" + randomBytes(12).toString("hex");
const SECRETS_SEEN = [KEY, PREV, SECRET];
const fingerprint = (k) =>
  createHmac("sha256", Buffer.from(k, "base64")).update("provider_keys_encrypt key fingerprint v1").digest("hex").slice(0, 16);

// A secret file: content, mode, owner ("postgres", "root" or "nobody").
const owners = { postgres: () => [pgId("-u"), pgId("-g")], root: () => [0, 0], nobody: () => [65534, 65534] };
function secretFile(name, content, mode, owner = "postgres") {
  mkdirSync(dir, { recursive: true });
  chmodSync(dir, 0o755);
  const p = join(dir, name);
  rmSync(p, { force: true });
  writeFileSync(p, content);
  chmodSync(p, mode);
  if (isRoot) chownSync(p, ...owners[owner]());
  return p;
}

const cluster = new Cluster("key-files", { port: 54460 });
after(() => { cluster.stop(); rmSync(dir, { recursive: true, force: true }); });

// The server log and everything a session printed hold none of the secrets.
function noSecretIn(...texts) {
  for (const t of [...texts, cluster.log()]) {
    for (const s of SECRETS_SEEN) assert.ok(!t.includes(s), "a secret appeared in output or the log");
  }
}

test("the right value: all three variables from files, as if set directly", () => {
  const env = {
    ENCRYPTION_KEY_FILE: secretFile("encryption_key", KEY + "\n", 0o600),
    ENCRYPTION_KEY_PREVIOUS_FILE: secretFile("previous", PREV + "\r\n", 0o400),
    GATEWAY_API_KEY_HASH_SECRET_FILE: secretFile("gateway", SECRET + "\n", 0o640),
  };
  cluster.env = env;
  cluster.start();
  assert.equal(cluster.psql("SHOW provider_keys_encrypt.encryption_key"),
    `from ENCRYPTION_KEY_FILE (${env.ENCRYPTION_KEY_FILE}), fingerprint ${fingerprint(KEY)}`);
  assert.equal(cluster.psql("SHOW provider_keys_encrypt.previous_keys"),
    `from ENCRYPTION_KEY_PREVIOUS_FILE (${env.ENCRYPTION_KEY_PREVIOUS_FILE}), fingerprints ${fingerprint(PREV)}`);
  assert.match(cluster.psql("SHOW provider_keys_encrypt.gateway_api_key_hash_secret"),
    new RegExp(`^from GATEWAY_API_KEY_HASH_SECRET_FILE \\(${env.GATEWAY_API_KEY_HASH_SECRET_FILE}\\), key ids \\S+$`));
  // the gateway's code reads what the database wrote, and the database what the gateway wrote,
  // under the current key and the previous one
  const token = cluster.psql("SELECT encrypt_token('sk-from-a-file-0001')");
  assert.equal(decrypt(token, Buffer.from(KEY, "base64")), "sk-from-a-file-0001");
  const old = encrypt("sk-under-previous-0002", Buffer.from(PREV, "base64"));
  assert.equal(cluster.psql(`SELECT decrypt_token('${old}')`), "sk-under-previous-0002");
  const ll = cluster.psql("SELECT llmgw_encrypt_token('sk-llmgw-file-0003', 'pk_1', 'org_1')");
  assert.equal(cluster.psql(`SELECT llmgw_decrypt_token('${ll}', 'pk_1', 'org_1')`), "sk-llmgw-file-0003");
  noSecretIn();
});

test("the file is read once, by the postmaster: a changed file takes effect at the restart", () => {
  const before = cluster.psql("SHOW provider_keys_encrypt.encryption_key");
  const other = randomBytes(32).toString("base64");
  secretFile("encryption_key", other + "\n", 0o600);
  // a new backend (each psql is one) still has what the server started with
  assert.equal(cluster.psql("SHOW provider_keys_encrypt.encryption_key"), before);
  cluster.restart();
  assert.match(cluster.psql("SHOW provider_keys_encrypt.encryption_key"), new RegExp(`fingerprint ${fingerprint(other)}$`));
  secretFile("encryption_key", KEY + "\n", 0o600);
});

// A refused ENCRYPTION_KEY_FILE: the functions that need the key raise `state`, SHOW says so.
function refused(env, state, message) {
  cluster.restart({ env });
  const r = cluster.run("SELECT encrypt_token('sk-x')", { allowFail: true, verbose: true });
  assert.notEqual(r.status, 0);
  assert.match(r.err, new RegExp(`ERROR:  ${state}: ${message}`));
  assert.match(r.err, /HINT: {2}\S/);
  assert.match(cluster.psql("SHOW provider_keys_encrypt.encryption_key"), new RegExp(`^refused: ${message}`));
  // the log says it once, at start (a WARNING from the postmaster)
  assert.match(cluster.log(), new RegExp(`WARNING:  provider_keys_encrypt: ${message}`));
  // the gateway keyring, given directly, is unaffected
  assert.match(cluster.psql("SELECT llmgw_encrypt_token('sk-y', 'pk_1', NULL)"), /^llmgw:v2:/);
  noSecretIn(r.err, r.out);
}

const base = () => ({ GATEWAY_API_KEY_HASH_SECRET: SECRET });

test("a missing file: 58P01", () => {
  const p = join(dir, "does-not-exist");
  refused({ ...base(), ENCRYPTION_KEY_FILE: p }, "58P01", `ENCRYPTION_KEY_FILE names ${p}, which does not exist`);
});

test("a file the server cannot read: 58030", { skip: !isRoot && "needs root to make a file postgres cannot read" }, () => {
  const p = secretFile("root_only", KEY + "\n", 0o600, "root");
  refused({ ...base(), ENCRYPTION_KEY_FILE: p }, "58030", `ENCRYPTION_KEY_FILE names ${p}, which the server cannot read: permission denied`);
  // a directory is no key file either
  refused({ ...base(), ENCRYPTION_KEY_FILE: dir }, "58030", `ENCRYPTION_KEY_FILE names ${dir}, which the server cannot read: not a regular file`);
});

test("a file others can read, or its group write: F0000, whatever it holds", () => {
  for (const mode of [0o644, 0o604, 0o660]) {
    const p = secretFile("world_readable", KEY + "\n", mode);
    refused({ ...base(), ENCRYPTION_KEY_FILE: p }, "F0000",
      `ENCRYPTION_KEY_FILE names ${p}, which other users can access \\(mode 0${mode.toString(8)}\\)`);
  }
});

test("a file owned by neither the server's user nor root: F0000", { skip: !isRoot && "needs root to chown" }, () => {
  // owner nobody, group postgres: the server can read it, but its owner could replace it
  const p = secretFile("nobodys", KEY + "\n", 0o640, "nobody");
  if (isRoot) chownSync(p, 65534, pgId("-g"));
  refused({ ...base(), ENCRYPTION_KEY_FILE: p }, "F0000",
    `ENCRYPTION_KEY_FILE names ${p}, which is owned by uid 65534; a key file must be owned by the server's user or root`);
  // root's, group postgres, 0640: the usual secret file, accepted
  const ok = secretFile("roots", KEY + "\n", 0o640, "root");
  if (isRoot) chownSync(ok, 0, pgId("-g"));
  cluster.restart({ env: { ...base(), ENCRYPTION_KEY_FILE: ok } });
  assert.equal(cluster.psql("SHOW provider_keys_encrypt.encryption_key"), `from ENCRYPTION_KEY_FILE (${ok}), fingerprint ${fingerprint(KEY)}`);
});

test("an empty file, or a relative path: 22023", () => {
  const p = secretFile("empty", "\n", 0o600);
  refused({ ...base(), ENCRYPTION_KEY_FILE: p }, "22023", `ENCRYPTION_KEY_FILE names ${p}, which holds no value`);
  refused({ ...base(), ENCRYPTION_KEY_FILE: "postgresql.conf" }, "22023", "ENCRYPTION_KEY_FILE names postgresql.conf, which is not an absolute path");
});

test("a path is shown escaped: it cannot start a log line", () => {
  const p = join(dir, "no\nLOG:  forged");
  refused({ ...base(), ENCRYPTION_KEY_FILE: p }, "58P01", `ENCRYPTION_KEY_FILE names ${dir}/no\\\\nLOG:  forged, which does not exist`);
  assert.ok(!cluster.log().includes("\nLOG:  forged"), "the raw newline reached the log");
});

test("both ENCRYPTION_KEY and ENCRYPTION_KEY_FILE: 42710", () => {
  const p = secretFile("encryption_key", KEY + "\n", 0o600);
  refused({ ...base(), ENCRYPTION_KEY: KEY, ENCRYPTION_KEY_FILE: p }, "42710",
    "both ENCRYPTION_KEY and ENCRYPTION_KEY_FILE are set in the server's environment; set only one");
});

test("a refused GATEWAY_API_KEY_HASH_SECRET_FILE stops llmgw only", () => {
  const p = secretFile("gateway_world", SECRET + "\n", 0o644);
  cluster.restart({ env: { ENCRYPTION_KEY: KEY, GATEWAY_API_KEY_HASH_SECRET_FILE: p } });
  const r = cluster.run("SELECT llmgw_encrypt_token('sk-y', 'pk_1', NULL)", { allowFail: true, verbose: true });
  assert.match(r.err, /ERROR: {2}F0000: GATEWAY_API_KEY_HASH_SECRET_FILE names .*which other users can access \(mode 0644\)/);
  assert.match(cluster.psql("SHOW provider_keys_encrypt.gateway_api_key_hash_secret"), /^refused: /);
  assert.equal(decrypt(cluster.psql("SELECT encrypt_token('sk-z')"), Buffer.from(KEY, "base64")), "sk-z");
  noSecretIn(r.err);
});

test("without preloading no backend reads a key file", () => {
  const p = secretFile("world_readable_np", KEY + "\n", 0o644);
  const np = new Cluster("key-files-nopreload", { port: 54461, preload: false, env: { ENCRYPTION_KEY_FILE: p } });
  try {
    np.start();
    const r = np.run("SELECT encrypt_token('sk-x')", { allowFail: true, verbose: true });
    assert.match(r.err, /ERROR: {2}F0000: provider_keys_encrypt is not in shared_preload_libraries/);
    assert.equal(np.script("LOAD 'provider_keys_encrypt';\nSHOW provider_keys_encrypt.encryption_key;"),
      "not read: provider_keys_encrypt is not in shared_preload_libraries, so keys are not read");
    // the file was never judged, so nothing about it was said anywhere
    assert.ok(!(r.err + np.log()).includes("world_readable_np"), "a backend read the key file");
  } finally {
    np.stop();
  }
});
