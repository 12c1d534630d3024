"""Alembic migrations of the connector's database, run by `proximity-sync db upgrade`.

`connector.schema` configures Alembic in code, so no alembic.ini is needed. To add a
migration after changing a table, run from the repository root:

    python -c "from connector.schema import new_revision; new_revision('add a column')"
"""
