// Upgrading from each earlier version equals a fresh install of the current one (every member object: signature,
// labels, language, body, ACL, comment), and an upgraded database keeps working on the data
// 0.1.0 wrote.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readdirSync } from "node:fs";
import { Cluster, TEST_KEY } from "./cluster.mjs";

const db = new Cluster("upgrade", { port: 54419, env: { ENCRYPTION_KEY: TEST_KEY } });
before(() => db.start());
after(() => db.stop());

const inDb = (name, sql) => db.script(`\\c ${name}\n${sql}`);

// One line per member object of the extension, with everything that must be equal.
const DESCRIBE = `
SELECT pg_describe_object(d.classid, d.objid, 0) || ' | ' ||
       COALESCE(CASE d.classid
         WHEN 'pg_proc'::regclass THEN (
           SELECT concat_ws(' | ', p.prokind, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid),
                            p.provolatile, p.proisstrict, p.proparallel, p.prosecdef, p.procost, p.proconfig::text,
                            l.lanname, md5(p.prosrc), p.probin, p.proacl::text)
             FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang WHERE p.oid = d.objid)
         WHEN 'pg_type'::regclass THEN (
           SELECT concat_ws(' | ', t.typtype, t.typacl::text,
                            (SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ', ' ORDER BY a.attnum)
                               FROM pg_attribute a WHERE a.attrelid = t.typrelid AND a.attnum > 0),
                            (SELECT string_agg(e.enumlabel, ', ' ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid))
             FROM pg_type t WHERE t.oid = d.objid)
         WHEN 'pg_namespace'::regclass THEN (SELECT n.nspacl::text FROM pg_namespace n WHERE n.oid = d.objid)
       END, '') || ' | ' || COALESCE(obj_description(d.objid, d.classid::regclass::name), '')
  FROM pg_depend d
 WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
   AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'provider_keys_encrypt')
 ORDER BY 1;`;

// Every earlier version with a frozen install script in sql/ (0.1.0, 0.2.0, 0.2.1, ...): installed,
// data written by its own engine, then ALTER EXTENSION UPDATE (through every step in between).
const FROZEN = readdirSync(new URL("../../sql/", import.meta.url))
  .map((f) => /^provider_keys_encrypt--(\d+\.\d+\.\d+)\.sql$/.exec(f)?.[1]).filter(Boolean)
  .sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
test("the frozen install scripts include every earlier release", () => {
  assert.deepEqual(FROZEN.slice(0, 3), ["0.1.0", "0.2.0", "0.2.1"]);
});
for (const from of FROZEN) {
  test(`ALTER EXTENSION UPDATE from ${from} gives exactly a fresh install of the current version`, () => {
    const fresh = `fresh_${from.replaceAll(".", "_")}`, upgraded = `upgraded_${from.replaceAll(".", "_")}`;
    db.psql("DROP EXTENSION IF EXISTS provider_keys_encrypt");
    db.psql(`CREATE DATABASE ${fresh}`);
    db.psql(`CREATE DATABASE ${upgraded}`);
    inDb(fresh, "CREATE EXTENSION provider_keys_encrypt;");
    const current = inDb(fresh, "SELECT extversion FROM pg_extension WHERE extname = 'provider_keys_encrypt';");
    assert.notEqual(current, from);
    inDb(upgraded, `CREATE EXTENSION provider_keys_encrypt VERSION '${from}';`);
    assert.equal(inDb(upgraded, "SELECT extversion FROM pg_extension WHERE extname = 'provider_keys_encrypt';"), from);
    // data written by that version's engine
    inDb(upgraded, `
      CREATE TABLE provider_key (id text PRIMARY KEY, token text NOT NULL, provider text NOT NULL, status text DEFAULT 'active');
      INSERT INTO provider_key SELECT 'u' || g, 'sk-upgrade-' || g, 'openai', CASE WHEN g % 5 = 0 THEN 'deleted' END FROM generate_series(1, 50) g;
      CALL encrypt_provider_keys(verbose => false);`);
    inDb(upgraded, "ALTER EXTENSION provider_keys_encrypt UPDATE;");
    const want = inDb(fresh, DESCRIBE).split("\n");
    const got = inDb(upgraded, DESCRIBE).split("\n");
    assert.ok(want.length > 30, `a fresh install has its objects (${want.length})`);
    assert.deepEqual(got, want);
    assert.equal(inDb(upgraded, "SELECT extversion FROM pg_extension WHERE extname = 'provider_keys_encrypt';"), current);
    // the current version reads and rolls back what the old one wrote
    assert.equal(inDb(upgraded, "SELECT keys FROM provider_keys_encryption_report() WHERE state = 'current_key';"), "40");
    inDb(upgraded, "CALL decrypt_provider_keys(verbose => false);");
    assert.equal(inDb(upgraded, "SELECT count(*) FROM provider_key WHERE token = 'sk-upgrade-' || substr(id, 2);"), "50");
  });
}
