"""Alembic environment for pggeolearn.

pggeolearn.db.schema runs Alembic with an open SQLAlchemy connection in
``config.attributes["connection"]``; the whole upgrade is one transaction (PostgreSQL has
transactional DDL), so a failed upgrade leaves the database as it was. After the
migrations, the functions of sql/NN_*.sql are (re)installed in the same transaction.
"""

from alembic import context

from pggeolearn.catalog import SCHEMA, metadata
from pggeolearn.db.schema import install_functions

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table_schema=SCHEMA,
    include_schemas=True,
    include_name=lambda name, type_, parent: type_ != "schema" or name == SCHEMA,
    transaction_per_migration=False,
)
with context.begin_transaction():
    connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    context.run_migrations()
    # The SQL functions always match the installed package, whatever the revision.
    install_functions(connection)
