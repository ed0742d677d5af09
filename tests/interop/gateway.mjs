// The gateway's token code, as its Node.js implementation does it (node:crypto only):
// AES-256-GCM, random 12-byte IV, base64(iv || authTag || ciphertext), key = base64 ENCRYPTION_KEY.
//   node gateway.mjs encrypt <plaintext>   |   decrypt <token>   |   fingerprint
import { createCipheriv, createDecipheriv, createHmac, randomBytes } from "node:crypto";

export function key() {
  const k = process.env.ENCRYPTION_KEY;
  if (!k) throw new Error("ENCRYPTION_KEY environment variable is required");
  const buf = Buffer.from(k, "base64");
  if (buf.length !== 32) throw new Error("ENCRYPTION_KEY must be a 32-byte key");
  return buf;
}

export function encrypt(text, k = key()) {
  const iv = randomBytes(12);
  const cipher = createCipheriv("aes-256-gcm", k, iv);
  const enc = Buffer.concat([cipher.update(text, "utf8"), cipher.final()]);
  return Buffer.concat([iv, cipher.getAuthTag(), enc]).toString("base64");
}

export function decrypt(token, k = key()) {
  const raw = Buffer.from(token, "base64");
  const decipher = createDecipheriv("aes-256-gcm", k, raw.subarray(0, 12));
  decipher.setAuthTag(raw.subarray(12, 28));
  return Buffer.concat([decipher.update(raw.subarray(28)), decipher.final()]).toString("utf8");
}

export function fingerprint(k = key()) {
  return createHmac("sha256", k).update("provider_keys_encrypt key fingerprint v1").digest("hex").slice(0, 16);
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const [cmd, arg] = process.argv.slice(2);
  if (cmd === "encrypt") console.log(encrypt(arg));
  else if (cmd === "decrypt") console.log(decrypt(arg));
  else if (cmd === "fingerprint") console.log(fingerprint());
  else { console.error("usage: gateway.mjs encrypt <text> | decrypt <token> | fingerprint"); process.exit(2); }
}
