"""The SQLite database: ``schema`` (the tables and their migrations), ``engine`` (the
group-committing writer, the readers, migrating at open) and the repositories over
them, ``store`` (tasks, transitions, the token ledger), ``acting`` (approvals, the
tool ledger, permission rules), ``schedules`` (schedules and their runs),
``conversations`` (the chat's conversations and messages), ``learning`` (task outcomes,
the similar-task memory and its vectors), ``reporting`` (what the metrics read of
the ledger, recorded violations) and ``usage`` (the usage report's aggregates of the
ledger, the messages and the outcomes); ``ids`` finds a record by a unique prefix of
its id; ``forget`` deletes a forgotten task's rows across them, keeping the ledger's
counts."""
