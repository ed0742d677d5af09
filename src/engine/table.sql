-- Which table a run works on, and everything checked before any row is read or written.
-- A global problem is one ERROR with its own SQLSTATE here, never a WARNING per row later.

-- The checks, in order: a table without inheritance children (a unique index on the parent
-- does not cover them; partitions are fine); the columns the mode reads (its format says
-- which), typed text or varchar, readable; the columns it sets to NULL, nullable; the columns
-- it writes, updatable; a unique index on id; id NOT NULL; and nobody who could make the table
-- run code with the caller's rights (check_table_trust). (The caller's right to the mode
-- itself is checked by pke_internal.mode.) writes => false (a dry run, the report) skips the
-- write privileges.
CREATE FUNCTION pke_internal.check_table(tbl regclass, m pke_internal.mode, writes boolean)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    col text;
    required boolean;
    typ regtype;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'relation "provider_key" does not exist'
            USING ERRCODE = 'undefined_table',
                  HINT = 'Check search_path, or name the table: CALL encrypt_provider_keys(table_name => ''myschema.provider_key'').';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = tbl AND c.relkind IN ('r', 'p')) THEN
        RAISE EXCEPTION '% is not a table', tbl USING ERRCODE = 'wrong_object_type';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_class c JOIN pg_inherits i ON i.inhparent = c.oid
                WHERE c.oid = tbl AND c.relkind = 'r') THEN
        RAISE EXCEPTION 'table % has inheritance children', tbl
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Its unique index on id does not cover the children. Run the procedure on each table of the hierarchy, or use declarative partitioning.';
    END IF;
    FOR col, required IN
        SELECT x.c, x.req
          FROM (SELECT u.c, true AS req, u.o FROM unnest(m.reads) WITH ORDINALITY AS u(c, o)
                UNION ALL
                SELECT u.c, false, 1000 + u.o FROM unnest(m.optional) WITH ORDINALITY AS u(c, o)) x
         ORDER BY x.o
    LOOP
        SELECT a.atttypid::regtype INTO typ
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
        IF writes AND col = ANY (m.writes) AND NOT has_column_privilege(tbl, col, 'UPDATE') THEN
            RAISE EXCEPTION 'permission denied to update column "%" of table %', col, tbl
                USING ERRCODE = 'insufficient_privilege';
        END IF;
    END LOOP;
    FOREACH col IN ARRAY m.sets_null LOOP
        IF EXISTS (SELECT 1 FROM pg_attribute a
                    WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped
                      AND a.attnotnull) THEN
            RAISE EXCEPTION 'column "%" of relation % is NOT NULL, and format % sets it to NULL', col, tbl, m.format
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = format('Each row keeps its key in exactly one column, as in the gateway''s rollout schema: ALTER TABLE %s ALTER COLUMN %I DROP NOT NULL;', tbl, col);
        END IF;
    END LOOP;
    -- The walk orders, bounds and compares ids in the column's own collation: ids that compare
    -- equal must be equal, and the unique index must order them that way (its collation, the
    -- default operator class), or a batch's id range would hold rows the batch did not choose.
    IF EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_collation c ON c.oid = a.attcollation
                WHERE a.attrelid = tbl AND a.attname = 'id' AND NOT c.collisdeterministic) THEN
        RAISE EXCEPTION 'column "id" of relation % has a nondeterministic collation', tbl
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'A run walks the table in id order, and needs ids that compare equal only when they are equal. Give id a deterministic collation (ALTER TABLE … ALTER COLUMN id TYPE text COLLATE "default").';
    END IF;
    IF NOT EXISTS (SELECT 1
                     FROM pg_index i
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                     JOIN pg_opclass oc ON oc.oid = i.indclass[0]
                    WHERE i.indrelid = tbl AND i.indisunique AND i.indisvalid AND i.indnkeyatts = 1
                      AND i.indpred IS NULL AND i.indexprs IS NULL AND a.attname = 'id'
                      AND i.indcollation[0] = a.attcollation AND oc.opcdefault) THEN
        RAISE EXCEPTION 'relation % has no unique index on column "id"', tbl
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'The index must be on id alone, in the column''s own collation and with the default operator class.',
                  HINT = format('A run walks the table in id order. Add one with: ALTER TABLE %s ADD PRIMARY KEY (id);', tbl);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = tbl AND a.attname = 'id' AND a.attnotnull) THEN
        RAISE EXCEPTION 'column "id" of relation % may be NULL', tbl
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('A run walks the table in id order and would never reach rows without one. Add: ALTER TABLE %s ALTER COLUMN id SET NOT NULL;', tbl);
    END IF;
    PERFORM pke_internal.check_table_trust(tbl, writes);
END
$fn$;

-- Who may put code in the table's way. Everything that runs while a run reads or writes the
-- table runs with the caller's rights: triggers (even a built-in trigger function's WHEN clause
-- can call query_to_xml), rules, row-level security policies, CHECK constraints, index
-- expressions and the support functions of the column types' operator classes, generated
-- columns — in the table and in every partition. Listing "code" is a losing game, so the rule
-- is about people: every role that can change any of that — the owner of each relation of the
-- tree, and each role granted TRIGGER on one — must be a role that could already act as the
-- caller (pg_has_role(role, current_user, 'USAGE'): the caller itself, a role the caller's
-- rights already include, or a superuser). Otherwise the run refuses before touching a row,
-- and the HINT says to run it as the owner. Reads (the report, a dry run) only meet row-level
-- security policies, so they are held to the rule only where a policy applies to the caller.
CREATE FUNCTION pke_internal.check_table_trust(tbl regclass, writes boolean)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    untrusted text;
    owner_name text;
BEGIN
    IF NOT writes AND NOT EXISTS (
        WITH RECURSIVE tree(oid) AS (
            SELECT tbl::oid
            UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid)
        SELECT 1 FROM tree JOIN pg_class c ON c.oid = tree.oid
         WHERE c.relrowsecurity
           AND NOT EXISTS (SELECT 1 FROM pg_roles r
                            WHERE r.rolname = current_user AND (r.rolsuper OR r.rolbypassrls))) THEN
        RETURN;  -- a read that no policy applies to runs no table code
    END IF;
    WITH RECURSIVE tree(oid) AS (
        SELECT tbl::oid
        UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid),
    who(rel, role_oid, what) AS (
        SELECT c.oid, c.relowner, 'owner'
          FROM tree JOIN pg_class c ON c.oid = tree.oid
        UNION ALL
        SELECT c.oid, a.grantee, 'TRIGGER privilege'
          FROM tree JOIN pg_class c ON c.oid = tree.oid, aclexplode(c.relacl) a
         WHERE a.privilege_type = 'TRIGGER')
    SELECT string_agg(format('%s (%s of %s)', CASE WHEN w.role_oid = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END,
                             w.what, w.rel::regclass), ', ' ORDER BY w.rel, w.what)
      INTO untrusted
      FROM who w LEFT JOIN pg_roles r ON r.oid = w.role_oid
     WHERE w.role_oid = 0 OR NOT pg_has_role(w.role_oid, current_user, 'USAGE');
    IF untrusted IS NOT NULL THEN
        SELECT r.rolname INTO owner_name FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE c.oid = tbl;
        RAISE EXCEPTION 'table % can be changed by roles that cannot act as you: %', tbl, untrusted
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Its triggers, rules, policies, constraints and indexes would run with your privileges, and those roles control them.',
                  HINT = format('Run it as the table''s owner: SET ROLE %I; CALL ...; RESET ROLE;', owner_name);
    END IF;
END
$fn$;
