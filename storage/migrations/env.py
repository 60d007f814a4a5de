"""Alembic environment for mergesearch's own tables: run on the connection the store
passes, with a version table of its own (Optuna keeps `alembic_version` for its tables)."""

from alembic import context

from storage.records import VERSION_TABLE, Base

context.configure(connection=context.config.attributes["connection"],
                  target_metadata=Base.metadata, version_table=VERSION_TABLE,
                  render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
