"""The SQLite database: ``schema`` (the tables and their migrations), ``engine`` (the
group-committing writer, the readers, migrating at open) and the repositories over
them, ``store`` (tasks, transitions, the token ledger) and ``acting`` (approvals, the
tool ledger, permission rules)."""
