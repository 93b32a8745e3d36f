-- Write or replace one project, as QGIS's "Save to PostgreSQL" does (content: a .qgz zip;
-- metadata: last_modified_time in UTC and last_modified_user).
INSERT INTO {table} (name, metadata, content)
VALUES (%(name)s, %(metadata)s::jsonb, %(content)s)
ON CONFLICT (name) DO UPDATE SET content = EXCLUDED.content, metadata = EXCLUDED.metadata
