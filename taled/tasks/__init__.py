"""Tasks: the durable queue, the lifecycle state machine, the runner and its
workers, the state a checkpoint holds, live progress."""
