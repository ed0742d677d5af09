// The gateway's own backfill to its current format (llmgw), rebuilt from its description, as a
// baseline for bench.mjs: select a batch of rows that have a token and no ciphertext (100 at a
// time, at most 1000), and for each row run one UPDATE that sets token NULL and fills
// token_ciphertext, token_hash and token_masked, keeps updated_at as it was, and applies only if
// token still holds the value it read. The crypto is the gateway's (node:crypto, via
// tests/interop/llmgw_gateway.mjs). Table name in PKE_TABLE (default gw_key). Prints JSON.
import pg from "pg";
import { keyring, encrypt, tokenHash, mask } from "../tests/interop/llmgw_gateway.mjs";

const table = process.env.PKE_TABLE ?? "gw_key";
const batchSize = Math.min(Number(process.env.PKE_BATCH ?? 100), 1000);
const secrets = keyring(process.env.GATEWAY_API_KEY_HASH_SECRET);
const client = new pg.Client();
await client.connect();
const t0 = process.hrtime.bigint();
let moved = 0, lost = 0;
for (;;) {
  const { rows } = await client.query(
    `SELECT id, token, organization_id, updated_at::text AS updated_at FROM ${table}
      WHERE token IS NOT NULL AND token_ciphertext IS NULL ORDER BY id LIMIT $1`, [batchSize]);
  if (rows.length === 0) break;
  for (const r of rows) {
    const res = await client.query(
      `UPDATE ${table} SET token = NULL, token_ciphertext = $1, token_hash = $2, token_masked = $3, updated_at = $4
        WHERE id = $5 AND token = $6`,
      [encrypt(secrets, r.token, r.id, r.organization_id), tokenHash(secrets, r.token), mask(r.token), r.updated_at, r.id, r.token]);
    if (res.rowCount === 1) moved++; else lost++;
  }
}
const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
await client.end();
console.log(JSON.stringify({ moved, lost, seconds }));
