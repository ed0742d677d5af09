// A reference implementation of the gateway's "llmgw" provider-key format, written the way
// the gateway's Node.js code does it (node:crypto only, no npm dependencies), from the format
// description in core/src/format/llmgw.rs. Rust's tests drive it to prove both sides agree.
//
// Protocol: one JSON request per line on stdin, one JSON response per line on stdout, in order.
//   {op:"kids",     secrets}                                   -> {kids:[…]}
//   {op:"encrypt",  secrets, plaintext, id, org, version?, ivHex?}  -> {token}
//        version "v2" (default) or "v1"; ivHex fixes the IV (test vectors only)
//   {op:"decrypt",  secrets, token, id, org}                   -> {plaintext} | {error, code}
//   {op:"hash",     secrets, plaintext}                        -> {hash}
//   {op:"mask",     plaintext}                                 -> {mask}  (as the database stores it)
//   {op:"b64decode", text}                                     -> {hex}
// `secrets` is the raw GATEWAY_API_KEY_HASH_SECRET value; `org` null means a NULL
// organization_id. Any thrown error becomes {error, code}.
//
//   echo '{"op":"kids","secrets":"a, b"}' | node tests/interop/llmgw_gateway.mjs
import { createCipheriv, createDecipheriv, createHmac, hkdfSync, randomBytes } from "node:crypto";
import { createInterface } from "node:readline";

const MANAGED_SCOPE = "llmgateway:managed";

class CodedError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

export function keyring(envValue) {
  const secrets = (envValue ?? "")
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean);
  if (secrets.length === 0) throw new CodedError("missing", "GATEWAY_API_KEY_HASH_SECRET is empty");
  return secrets;
}

function hkdf(secret, info, length) {
  return Buffer.from(hkdfSync("sha256", Buffer.from(secret, "utf8"), Buffer.alloc(0), Buffer.from(info, "utf8"), length));
}

export const dataKey = (secret) => hkdf(secret, "provider-key-token:v1", 32);
export const keyId = (secret) => hkdf(secret, "gateway-secret-key-id:v1", 4).toString("hex");

const aad = (id, org) => Buffer.from(`provider_key|${id}|${org ?? MANAGED_SCOPE}`, "utf8");

function b64urlEncode(buf) {
  return buf.toString("base64").replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

export function b64urlDecode(text) {
  const padded = text + "=".repeat((4 - (text.length % 4)) % 4);
  return Buffer.from(padded.replace(/-/g, "+").replace(/_/g, "/"), "base64");
}

export function encrypt(secrets, plaintext, id, org, version = "v2", ivHex = undefined) {
  const secret = secrets[0];
  const iv = ivHex === undefined ? randomBytes(12) : Buffer.from(ivHex, "hex");
  const cipher = createCipheriv("aes-256-gcm", dataKey(secret), iv);
  cipher.setAAD(aad(id, org));
  const ct = Buffer.concat([cipher.update(plaintext, "utf8"), cipher.final()]);
  const tail = [b64urlEncode(iv), b64urlEncode(ct), b64urlEncode(cipher.getAuthTag())];
  if (version === "v1") return ["llmgw", "v1", ...tail].join(":");
  return ["llmgw", "v2", keyId(secret), ...tail].join(":");
}

function openWith(candidates, ivB64, ctB64, tagB64, id, org) {
  const iv = b64urlDecode(ivB64);
  const ct = b64urlDecode(ctB64);
  const tag = b64urlDecode(tagB64);
  if (iv.length !== 12) throw new CodedError("iv_length", `invalid iv length ${iv.length}`);
  if (tag.length !== 16) throw new CodedError("tag_length", `invalid tag length ${tag.length}`);
  for (const secret of candidates) {
    try {
      const decipher = createDecipheriv("aes-256-gcm", dataKey(secret), iv);
      decipher.setAAD(aad(id, org));
      decipher.setAuthTag(tag);
      return Buffer.concat([decipher.update(ct), decipher.final()]).toString("utf8");
    } catch {
      // wrong secret, tampered, or another row's token: GCM cannot tell; try the next one
    }
  }
  throw new CodedError("auth", "does not authenticate");
}

export function decrypt(secrets, token, id, org) {
  const parts = token.split(":");
  if (token.startsWith("llmgw:v2:")) {
    if (parts.length !== 6) throw new CodedError("part_count", `expected 6 parts, got ${parts.length}`);
    const [, , kid, iv, ct, tag] = parts;
    const candidates = secrets.filter((s) => keyId(s) === kid);
    if (candidates.length === 0) throw new CodedError("unknown_kid", `unknown key id ${kid}`);
    return openWith(candidates, iv, ct, tag, id, org);
  }
  if (token.startsWith("llmgw:v1:")) {
    if (parts.length !== 5) throw new CodedError("part_count", `expected 5 parts, got ${parts.length}`);
    const [, , iv, ct, tag] = parts;
    return openWith(secrets, iv, ct, tag, id, org);
  }
  throw new CodedError("unknown_version", "unknown ciphertext version");
}

export function tokenHash(secrets, plaintext) {
  return createHmac("sha256", secrets[0]).update(plaintext).digest("hex");
}

// JavaScript string semantics: length and slice count UTF-16 code units.
export function mask(plaintext) {
  if (!plaintext) return "";
  const n = plaintext.length;
  const visible = Math.max(0, Math.min(12, n - 4));
  return plaintext.slice(0, visible) + "\u2022".repeat(Math.min(Math.max(n - visible, 4), 5));
}

// What the database ends up holding: the driver sends UTF-8, which turns a lone surrogate
// (a cut surrogate pair) into U+FFFD.
const asStored = (s) => Buffer.from(s, "utf8").toString("utf8");

function handle(req) {
  switch (req.op) {
    case "kids":
      return { kids: keyring(req.secrets).map(keyId) };
    case "encrypt":
      return { token: encrypt(keyring(req.secrets), req.plaintext, req.id, req.org, req.version, req.ivHex) };
    case "decrypt":
      return { plaintext: decrypt(keyring(req.secrets), req.token, req.id, req.org) };
    case "hash":
      return { hash: tokenHash(keyring(req.secrets), req.plaintext) };
    case "mask":
      return { mask: asStored(mask(req.plaintext)) };
    case "b64decode":
      return { hex: b64urlDecode(req.text).toString("hex") };
    default:
      throw new CodedError("bad_op", `unknown op ${req.op}`);
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
  for await (const line of rl) {
    let res;
    try {
      res = handle(JSON.parse(line));
    } catch (e) {
      res = { error: e.message, code: e.code ?? "exception" };
    }
    process.stdout.write(JSON.stringify(res) + "\n");
  }
}
