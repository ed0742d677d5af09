-- Which table a run works on, and everything checked before any row is read or written.
-- A global problem is one ERROR with its own SQLSTATE here, never a WARNING per row later.

-- The checks, in order: a table without inheritance children (a unique index on the parent
-- does not cover them; partitions are fine); the columns the mode reads (its format says
-- which), typed text or varchar, readable; row security that applies to the caller (a run must
-- see every row); rules; the columns it sets to NULL, nullable; the columns
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
    forced boolean;
    owner_name text;
    rule_name text;
    rule_rel regclass;
    fk_name text;
    fk_rel regclass;
    fk_col text;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'relation "provider_key" does not exist'
            USING ERRCODE = 'undefined_table',
                  HINT = 'Check search_path, or name the table: CALL @extschema@.encrypt_provider_keys(table_name => ''myschema.provider_key'').';
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
    -- Row security: a run must see, and may write, every row, or "completed" would count only
    -- the rows a policy shows it. Refused here, with the way out; and every engine function that
    -- reads the table sets row_security = off, so a policy that applies anyway (a role change
    -- during the run) raises instead of hiding rows.
    IF row_security_active(tbl) THEN
        SELECT c.relforcerowsecurity, r.rolname INTO forced, owner_name
          FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE c.oid = tbl;
        RAISE EXCEPTION 'row-level security applies to you on table %: a run would not see every row', tbl
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'Its policies decide which rows you can read and write; a run must reach every row to say that every key is done.',
                  HINT = CASE WHEN forced
                      THEN format('The table forces row security on its owner too (FORCE ROW LEVEL SECURITY). Give the table to a role of its own that bypasses row security and that the application does not log in as (as a superuser: CREATE ROLE pke_owner BYPASSRLS NOLOGIN; ALTER TABLE %2$s OWNER TO pke_owner; GRANT SELECT, INSERT, UPDATE, DELETE ON %2$s TO %1$I;), then SET ROLE pke_owner; CALL ...; RESET ROLE; (ALTER ROLE %1$I BYPASSRLS would lift the tenant policy from every session of that role while it lasts.)', owner_name, tbl)
                      ELSE format('Run it as the table''s owner, to whom its policies do not apply: SET ROLE %I; CALL ...; RESET ROLE;', owner_name) END;
    END IF;
    -- A rule would rewrite the run's UPDATE into something else (or into nothing).
    SELECT r.rulename, r.ev_class::regclass INTO rule_name, rule_rel
      FROM pg_rewrite r
     WHERE r.ev_class = tbl
        OR r.ev_class IN (WITH RECURSIVE tree(oid) AS (
                              SELECT tbl::oid
                              UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid)
                          SELECT tree.oid FROM tree)
     ORDER BY 2::text, 1 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'table % has rule %: a run''s writes would be rewritten', rule_rel, quote_ident(rule_name)
            USING ERRCODE = 'feature_not_supported',
                  DETAIL = 'A rule replaces or adds to the UPDATE a run makes, so the run could not know what it wrote.',
                  HINT = format('Drop the rule for the run (DROP RULE %I ON %s), and create it again after.', rule_name, rule_rel);
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
    -- A foreign key that references a column the run writes: its ON UPDATE action would copy
    -- the new values into the referencing table (plaintext, for a decrypt), or refuse every
    -- row's write (NO ACTION, RESTRICT).
    IF writes THEN
        SELECT c.conname, c.conrelid::regclass, a.attname INTO fk_name, fk_rel, fk_col
          FROM pg_constraint c
          JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = ANY (c.confkey)
         WHERE c.contype = 'f' AND a.attname = ANY (m.writes)
           AND c.confrelid IN (WITH RECURSIVE tree(oid) AS (
                                   SELECT tbl::oid
                                   UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid)
                               SELECT tree.oid FROM tree)
         ORDER BY 2::text, 1 LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'column "%" of relation % is referenced by foreign key % of table %', fk_col, tbl, quote_ident(fk_name), fk_rel
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'A run''s writes to that column would be copied into the referencing table (ON UPDATE CASCADE), or refused for every row.',
                      HINT = format('A key column should not be what other tables point at. Drop the foreign key (ALTER TABLE %s DROP CONSTRAINT %I), then run again.', fk_rel, fk_name);
        END IF;
    END IF;
    PERFORM pke_internal.check_table_trust(tbl, writes);
END
$fn$;

-- Who may put code in the table's way. Everything that runs while a run writes the table runs
-- with the caller's rights: triggers (even a built-in trigger function's WHEN clause can call
-- query_to_xml), rules, row-level security policies, CHECK constraints, defaults and generated
-- columns, index expressions and the operator classes of the indexes — in the table and in
-- every partition. The rule is about people, at two levels:
--   * who can change the table's code: the owner of each relation of the tree, and each role
--     granted TRIGGER on one;
--   * who can change the code the table calls: the owner of every function, operator, operator
--     class and operator family that the tree's triggers, constraints, defaults, generated
--     columns, indexes, policies and rules depend on (pg_depend records each of them, the
--     trigger functions included), and of the support functions and operators of those
--     operator classes.
-- Each of them must be a role that could already act as the caller (pg_has_role(role,
-- current_user, 'USAGE'): the caller itself, a role the caller's rights already include, or a
-- superuser). Otherwise the run refuses before touching a row (42501, naming each object and
-- its owner, never a value). What those functions call in turn is their owners' business: a
-- trusted owner's function runs as written. Reads (the report, a dry run) run no code of the
-- table: they only scan it, with row security refused when it applies (check_table).
CREATE FUNCTION pke_internal.check_table_trust(tbl regclass, writes boolean)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    untrusted text;
    first_ord integer;
    first_fix text;
    owner_name text;
BEGIN
    IF NOT writes THEN
        RETURN;
    END IF;
    WITH RECURSIVE tree(oid) AS (
        SELECT tbl::oid
        UNION SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid),
    -- the types of the tree's columns, and the types they are made of (a domain's base type, an
    -- array's element type, a range's subtype), of which the domains: a generated column's
    -- value is checked against its domain's constraints on every write
    types(typ) AS (
        SELECT DISTINCT a.atttypid
          FROM tree JOIN pg_attribute a ON a.attrelid = tree.oid
         WHERE a.attnum > 0 AND NOT a.attisdropped
        UNION
        SELECT x.typ
          FROM types y JOIN pg_type t ON t.oid = y.typ,
               LATERAL (SELECT t.typbasetype WHERE t.typtype = 'd'
                        UNION ALL SELECT t.typelem WHERE t.typelem <> 0
                        UNION ALL SELECT r.rngsubtype FROM pg_range r WHERE r.rngtypid = t.oid) AS x(typ)),
    domains(typ) AS (
        SELECT y.typ FROM types y JOIN pg_type t ON t.oid = y.typ WHERE t.typtype = 'd'),
    -- the parts of the tree whose code a write can run
    parts(classid, objid, part) AS (
        SELECT 'pg_constraint'::regclass::oid, c.oid, format('constraint %s of domain %s', quote_ident(c.conname), c.contypid::regtype)
          FROM domains d JOIN pg_constraint c ON c.contypid = d.typ
        UNION ALL
        SELECT 'pg_trigger'::regclass::oid, tg.oid, format('trigger %s on %s', quote_ident(tg.tgname), tg.tgrelid::regclass)
          FROM tree JOIN pg_trigger tg ON tg.tgrelid = tree.oid
        UNION ALL
        SELECT 'pg_constraint'::regclass::oid, c.oid, format('constraint %s on %s', quote_ident(c.conname), c.conrelid::regclass)
          FROM tree JOIN pg_constraint c ON c.conrelid = tree.oid
        UNION ALL
        SELECT 'pg_attrdef'::regclass::oid, d.oid, format('the default or generation expression of %s.%s', d.adrelid::regclass, quote_ident(a.attname))
          FROM tree JOIN pg_attrdef d ON d.adrelid = tree.oid
          JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
        UNION ALL
        SELECT 'pg_class'::regclass::oid, i.indexrelid, format('index %s', i.indexrelid::regclass)
          FROM tree JOIN pg_index i ON i.indrelid = tree.oid
        UNION ALL
        SELECT 'pg_policy'::regclass::oid, p.oid, format('policy %s on %s', quote_ident(p.polname), p.polrelid::regclass)
          FROM tree JOIN pg_policy p ON p.polrelid = tree.oid
        UNION ALL
        SELECT 'pg_rewrite'::regclass::oid, r.oid, format('rule %s on %s', quote_ident(r.rulename), r.ev_class::regclass)
          FROM tree JOIN pg_rewrite r ON r.ev_class = tree.oid),
    -- what those parts call, as pg_depend records it
    refs(part, refclassid, refobjid) AS (
        SELECT DISTINCT p.part, d.refclassid, d.refobjid
          FROM parts p JOIN pg_depend d ON d.classid = p.classid AND d.objid = p.objid
         WHERE d.refclassid IN ('pg_proc'::regclass, 'pg_operator'::regclass, 'pg_opclass'::regclass,
                                'pg_opfamily'::regclass)),
    -- an operator class stands for its family, with every support function and operator in it
    families(part, fam) AS (
        SELECT r.part, oc.opcfamily FROM refs r JOIN pg_opclass oc ON oc.oid = r.refobjid
         WHERE r.refclassid = 'pg_opclass'::regclass
        UNION
        SELECT r.part, r.refobjid FROM refs r WHERE r.refclassid = 'pg_opfamily'::regclass),
    operators(part, opr) AS (
        SELECT r.part, r.refobjid FROM refs r WHERE r.refclassid = 'pg_operator'::regclass
        UNION
        SELECT f.part, ao.amopopr FROM families f JOIN pg_amop ao ON ao.amopfamily = f.fam),
    -- each with the statement that gives it to the caller (the HINT)
    code(kind, object, owner, part, fix) AS (
        SELECT 'function', r.refobjid::regprocedure::text, pr.proowner, r.part,
               format('ALTER FUNCTION %s OWNER TO %I', r.refobjid::regprocedure, current_user)
          FROM refs r JOIN pg_proc pr ON pr.oid = r.refobjid
         WHERE r.refclassid = 'pg_proc'::regclass
        UNION
        SELECT 'function', ap.amproc::regprocedure::text, pr.proowner, f.part,
               format('ALTER FUNCTION %s OWNER TO %I', ap.amproc::regprocedure, current_user)
          FROM families f JOIN pg_amproc ap ON ap.amprocfamily = f.fam JOIN pg_proc pr ON pr.oid = ap.amproc
        UNION
        SELECT 'operator', o.opr::regoperator::text, op.oprowner, o.part,
               format('ALTER OPERATOR %s OWNER TO %I', o.opr::regoperator, current_user)
          FROM operators o JOIN pg_operator op ON op.oid = o.opr
        UNION
        SELECT 'function', op.oprcode::regprocedure::text, pr.proowner, o.part,
               format('ALTER FUNCTION %s OWNER TO %I', op.oprcode::regprocedure, current_user)
          FROM operators o JOIN pg_operator op ON op.oid = o.opr JOIN pg_proc pr ON pr.oid = op.oprcode
        UNION
        SELECT 'domain', d.typ::regtype::text, t.typowner, 'a column of the table',
               format('ALTER DOMAIN %s OWNER TO %I', d.typ::regtype, current_user)
          FROM domains d JOIN pg_type t ON t.oid = d.typ
        UNION
        SELECT 'operator family', format('%I.%I USING %I', n.nspname, fa.opfname, am.amname), fa.opfowner, f.part,
               format('ALTER OPERATOR FAMILY %I.%I USING %I OWNER TO %I', n.nspname, fa.opfname, am.amname, current_user)
          FROM families f JOIN pg_opfamily fa ON fa.oid = f.fam
          JOIN pg_namespace n ON n.oid = fa.opfnamespace JOIN pg_am am ON am.oid = fa.opfmethod),
    -- who controls the table itself
    who(rel, role_oid, what) AS (
        SELECT c.oid, c.relowner, 'owner'
          FROM tree JOIN pg_class c ON c.oid = tree.oid
        UNION ALL
        SELECT c.oid, a.grantee, 'TRIGGER privilege'
          FROM tree JOIN pg_class c ON c.oid = tree.oid, aclexplode(c.relacl) a
         WHERE a.privilege_type = 'TRIGGER'
        UNION ALL
        -- a foreign key of theirs on the table's columns would make the run's writes cascade
        -- into their table (plaintext, for a decrypt)
        SELECT c.oid, a.grantee, 'REFERENCES privilege'
          FROM tree JOIN pg_class c ON c.oid = tree.oid, aclexplode(c.relacl) a
         WHERE a.privilege_type = 'REFERENCES'
        UNION ALL
        SELECT c.oid, a.grantee, format('REFERENCES privilege on column %I', at.attname)
          FROM tree JOIN pg_class c ON c.oid = tree.oid
          JOIN pg_attribute at ON at.attrelid = c.oid AND at.attnum > 0 AND NOT at.attisdropped,
               aclexplode(at.attacl) a
         WHERE a.privilege_type = 'REFERENCES'),
    -- objects in this session's temporary schema that someone else created (code run under
    -- SET ROLE earlier in the session): an unqualified table or type name in a trusted
    -- trigger finds them before anything else the run's search_path holds
    temps(object, owner) AS (
        SELECT format('%s %s', CASE WHEN c.relkind IN ('r', 'p') THEN 'table' ELSE 'relation' END, c.oid::regclass), c.relowner
          FROM pg_class c WHERE c.relnamespace = pg_my_temp_schema()
        UNION ALL
        SELECT format('type %s', t.oid::regtype), t.typowner
          FROM pg_type t WHERE t.typnamespace = pg_my_temp_schema() AND t.typrelid = 0
        UNION ALL
        SELECT format('function %s', p.oid::regprocedure), p.proowner
          FROM pg_proc p WHERE p.pronamespace = pg_my_temp_schema()),
    bad(ord, fix, text) AS (
        SELECT 1,
               CASE WHEN w.what = 'owner' THEN NULL
                    WHEN w.what LIKE 'REFERENCES privilege on column %' THEN
                        format('REVOKE REFERENCES (%s) ON %s FROM %s', substr(w.what, 32), w.rel::regclass,
                               CASE WHEN w.role_oid = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END)
                    ELSE format('REVOKE %s ON %s FROM %s', split_part(w.what, ' ', 1), w.rel::regclass,
                                CASE WHEN w.role_oid = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END) END,
               format('%s (%s of %s)', CASE WHEN w.role_oid = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END,
                      w.what, w.rel::regclass)
          FROM who w LEFT JOIN pg_roles r ON r.oid = w.role_oid
         WHERE w.role_oid = 0 OR NOT pg_has_role(w.role_oid, current_user, 'USAGE')
        UNION ALL
        SELECT 2, c.fix, format('%s %s (owner %s, run by %s)', c.kind, c.object, quote_ident(r.rolname), c.part)
          FROM code c JOIN pg_roles r ON r.oid = c.owner
         WHERE NOT pg_has_role(c.owner, current_user, 'USAGE')
        UNION ALL
        SELECT 3, NULL, format('%s in this session''s temporary schema (owner %s)', tm.object, quote_ident(r.rolname))
          FROM temps tm JOIN pg_roles r ON r.oid = tm.owner
         WHERE NOT pg_has_role(tm.owner, current_user, 'USAGE'))
    SELECT string_agg(b.text, ', ' ORDER BY b.ord, b.text),
           (array_agg(b.ord ORDER BY b.ord, b.text))[1],
           (array_agg(b.fix ORDER BY b.ord, b.text))[1]
      INTO untrusted, first_ord, first_fix
      FROM bad b;
    IF untrusted IS NOT NULL THEN
        SELECT r.rolname INTO owner_name FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE c.oid = tbl;
        RAISE EXCEPTION 'table % runs code that roles who cannot act as you control: %', tbl, untrusted
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'A write to the table runs its triggers, rules, policies, constraints, defaults, generated columns and indexes, and the functions and operators they call, with your privileges; those roles can change what that code does.',
                  HINT = CASE WHEN first_ord = 1 AND first_fix IS NULL
                      THEN format('Run it as the table''s owner: SET ROLE %I; CALL ...; RESET ROLE;', owner_name)
                      WHEN first_ord = 1
                      THEN format('Take the privilege back if that role does not need it (%s;), then run again.', first_fix)
                      WHEN first_ord = 3
                      THEN 'Drop this session''s temporary objects (DISCARD TEMP;), or run it in a new session.'
                      ELSE format('Read that code, then give it to a role you trust (as its owner or a superuser: %s;), or take it off the table.',
                                  first_fix) END;
    END IF;
END
$fn$;
