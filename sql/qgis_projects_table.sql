-- The table QGIS (>= 3.2) keeps projects in, exactly as QgsPostgresUtils::createProjectsTable
-- makes it: Browser > PostgreSQL lists a schema's projects from here.
CREATE TABLE IF NOT EXISTS {table} (
    name TEXT PRIMARY KEY,
    metadata JSONB,
    content BYTEA
)
