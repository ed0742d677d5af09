-- Which table a run works on, and everything checked before any row is read or written.
-- A global problem is one ERROR with its own SQLSTATE here, never a WARNING per row later.

-- The checks, in order: a table; the columns the mode reads (its format says which), typed
-- text or varchar, readable; the columns it sets to NULL, nullable; the columns it writes,
-- updatable; a unique index on id; and no code belonging to another role that would run with
-- the caller's rights (check_table_code). (The caller's right to the mode itself is checked by
-- pke_internal.mode.) writes => false (a dry run, the report) skips the write privileges.
CREATE FUNCTION pke_internal.check_table(tbl regclass, m pke_internal.mode, writes boolean)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    col text;
    required boolean;
    typ regtype;
    not_null boolean;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'relation "provider_key" does not exist'
            USING ERRCODE = 'undefined_table',
                  HINT = 'Check search_path, or name the table: CALL encrypt_provider_keys(table_name => ''myschema.provider_key'').';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = tbl AND c.relkind IN ('r', 'p')) THEN
        RAISE EXCEPTION '% is not a table', tbl USING ERRCODE = 'wrong_object_type';
    END IF;
    FOR col, required IN
        SELECT x.c, x.req
          FROM (SELECT u.c, true AS req, u.o FROM unnest(m.reads) WITH ORDINALITY AS u(c, o)
                UNION ALL
                SELECT u.c, false, 1000 + u.o FROM unnest(m.optional) WITH ORDINALITY AS u(c, o)) x
         ORDER BY x.o
    LOOP
        SELECT a.atttypid::regtype, a.attnotnull INTO typ, not_null
          FROM pg_attribute a
         WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
        IF NOT FOUND THEN
            CONTINUE WHEN NOT required;
            RAISE EXCEPTION 'column "%" of relation % does not exist', col, tbl
                USING ERRCODE = 'undefined_column', HINT = m.table_hint;
        END IF;
        IF typ NOT IN ('text'::regtype, 'character varying'::regtype) THEN
            RAISE EXCEPTION 'column "%" of relation % must be text or varchar, not %', col, tbl, typ
                USING ERRCODE = 'datatype_mismatch';
        END IF;
        IF NOT has_column_privilege(tbl, col, 'SELECT') THEN
            RAISE EXCEPTION 'permission denied to read column "%" of table %', col, tbl
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        IF not_null AND col = ANY (m.sets_null) THEN
            RAISE EXCEPTION 'column "%" of relation % is NOT NULL, and a % run sets it to NULL', col, tbl, m.format
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = format('Each row keeps its key in exactly one column, as in the gateway''s rollout schema: ALTER TABLE %s ALTER COLUMN %I DROP NOT NULL;', tbl, col);
        END IF;
        IF writes AND col = ANY (m.writes) AND NOT has_column_privilege(tbl, col, 'UPDATE') THEN
            RAISE EXCEPTION 'permission denied to update column "%" of table %', col, tbl
                USING ERRCODE = 'insufficient_privilege';
        END IF;
    END LOOP;
    IF NOT EXISTS (SELECT 1
                     FROM pg_index i
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                    WHERE i.indrelid = tbl AND i.indisunique AND i.indisvalid AND i.indnkeyatts = 1
                      AND i.indpred IS NULL AND i.indexprs IS NULL AND a.attname = 'id') THEN
        RAISE EXCEPTION 'relation % has no unique index on column "id"', tbl
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('A run walks the table in id order. Add one with: ALTER TABLE %s ADD PRIMARY KEY (id);', tbl);
    END IF;
    IF writes THEN
        PERFORM pke_internal.check_table_code(tbl);
    END IF;
END
$fn$;

-- Code that belongs to the table runs with the rights of whoever UPDATEs it: triggers, rules,
-- row-level security policies, CHECK constraints, index expressions and operator classes,
-- generated columns. A run refuses to execute such code when it belongs to a role that could
-- not already act as the caller (a superuser running the procedures on a table an untrusted
-- role owns, say): that would hand the owner the caller's rights. Built-in functions and
-- operators, and this extension's own objects (the guard), are not such code.
CREATE FUNCTION pke_internal.check_table_code(tbl regclass)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    owner regrole;
    code text[];
BEGIN
    SELECT c.relowner::regrole INTO owner FROM pg_class c WHERE c.oid = tbl;
    IF pg_has_role(owner, current_user, 'USAGE') THEN
        RETURN;  -- the caller is the owner, or the owner could already act with the caller's rights
    END IF;
    WITH attached(kind, name, classid, objid) AS (
        SELECT 'trigger', tg.tgname::text, 'pg_trigger'::regclass, tg.oid
          FROM pg_trigger tg WHERE tg.tgrelid = tbl AND NOT tg.tgisinternal AND tg.tgenabled <> 'D'
        UNION ALL
        SELECT 'rule', r.rulename::text, 'pg_rewrite'::regclass, r.oid
          FROM pg_rewrite r WHERE r.ev_class = tbl AND r.rulename <> '_RETURN'
        UNION ALL
        SELECT 'policy', po.polname::text, 'pg_policy'::regclass, po.oid
          FROM pg_policy po JOIN pg_class c ON c.oid = po.polrelid
         WHERE po.polrelid = tbl AND c.relrowsecurity
        UNION ALL
        SELECT 'constraint', co.conname::text, 'pg_constraint'::regclass, co.oid
          FROM pg_constraint co WHERE co.conrelid = tbl AND co.contype = 'c'
        UNION ALL
        SELECT 'index', ic.relname::text, 'pg_class'::regclass, ic.oid
          FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid WHERE i.indrelid = tbl
        UNION ALL
        SELECT 'generated column', a.attname::text, 'pg_attrdef'::regclass, ad.oid
          FROM pg_attrdef ad JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
         WHERE ad.adrelid = tbl AND a.attgenerated <> ''
    )
    SELECT array_agg(format('%s %I', x.kind, x.name) ORDER BY x.kind, x.name) INTO code
      FROM attached x
     WHERE x.kind = 'rule'
        OR EXISTS (
            -- built-in objects are pinned and have no pg_depend rows: any row here names code
            -- someone created (a function, an operator, an operator class, a type)
            SELECT 1 FROM pg_depend d
             WHERE d.classid = x.classid AND d.objid = x.objid
               AND d.refclassid IN ('pg_proc'::regclass, 'pg_operator'::regclass, 'pg_opclass'::regclass,
                                    'pg_opfamily'::regclass, 'pg_type'::regclass)
               AND NOT EXISTS (SELECT 1 FROM pg_depend e
                                WHERE e.classid = d.refclassid AND e.objid = d.refobjid AND e.deptype = 'e'
                                  AND e.refclassid = 'pg_extension'::regclass
                                  AND e.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'provider_keys_encrypt')));
    IF code IS NOT NULL THEN
        RAISE EXCEPTION 'table % belongs to role %, and its % would run with your privileges', tbl, owner, array_to_string(code, ', ')
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Triggers, rules, policies, constraints and indexes of a table run with the rights of the role that updates it.',
                  HINT = format('Run it as the table''s owner: SET ROLE %s; CALL ...; RESET ROLE;', owner);
    END IF;
END
$fn$;
