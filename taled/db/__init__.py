"""The SQLite database: ``schema`` (the tables and their migrations), ``engine`` (the
group-committing writer, the readers, migrating at open) and the repositories over
them, ``store`` (tasks, transitions, the token ledger), ``acting`` (approvals, the
tool ledger, permission rules) and ``schedules`` (schedules and their runs); ``forget``
deletes a forgotten task's rows across them, keeping the ledger's counts."""
