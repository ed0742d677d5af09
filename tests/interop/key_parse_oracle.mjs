// The gateway's key rule, as an oracle for core/tests/key_parsing_node_diff.rs: the gateway
// reads ENCRYPTION_KEY with Buffer.from(key, "base64") and requires 32 bytes (gateway.mjs, key()).
// Line protocol. stdin: one string per line, as the hex of its UTF-8 bytes.
// stdout: one line per input: "ok <hex of the 32 key bytes>" or "no <decoded length>".
// Node built-ins only.   Usage: node tests/interop/key_parse_oracle.mjs
import { createInterface } from "node:readline";

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
let out = [];
for await (const line of lines) {
  const key = Buffer.from(line, "hex").toString("utf8");
  const buf = Buffer.from(key, "base64");
  out.push(buf.length === 32 ? `ok ${buf.toString("hex")}` : `no ${buf.length}`);
  if (out.length === 4096) {
    process.stdout.write(out.join("\n") + "\n");
    out = [];
  }
}
if (out.length) process.stdout.write(out.join("\n") + "\n");
