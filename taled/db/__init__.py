"""The SQLite store: tables, migrations, the group-committing writer and the
task repository."""
