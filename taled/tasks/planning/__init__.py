"""Planning: a complex task becomes a DAG of subtasks (the task model's JSON
plan, repaired leniently, or a heuristic plan)."""
