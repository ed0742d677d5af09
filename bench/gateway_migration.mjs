// The gateway's migration as its guide (MIGRATION.md) describes it: fetch all non-deleted
// provider keys, skip the ones that "look encrypted" (its shape check), encrypt the others with
// node:crypto and UPDATE them one by one. Used as a baseline by bench.mjs. Prints JSON.
import pg from "pg";
import { encrypt, key } from "../tests/interop/gateway.mjs";

const looksEncrypted = (t) => { try { return Buffer.from(t, "base64").length >= 28 && /^[A-Za-z0-9+/]+=*$/.test(t); } catch { return false; } };
const client = new pg.Client();
await client.connect();
const k = key();
const t0 = process.hrtime.bigint();
const { rows } = await client.query("SELECT id, token, provider FROM provider_key WHERE status IS DISTINCT FROM 'deleted'");
let encrypted = 0, skipped = 0;
for (const r of rows) {
  if (looksEncrypted(r.token)) { skipped++; continue; }
  await client.query("UPDATE provider_key SET token = $1 WHERE id = $2", [encrypt(r.token, k), r.id]);
  encrypted++;
}
const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
await client.end();
console.log(JSON.stringify({ total: rows.length, encrypted, skipped, seconds }));
