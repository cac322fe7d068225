"""Forgetting tasks: ``tale delete``, ``tale purge`` and ``retention.keep_days``.

``forget.py`` is the service (what goes where, in which order, and the journal that
finishes a forgetting a crash cut off), ``age.py`` reads ``--older-than`` durations,
``sweep.py`` applies ``retention.keep_days`` on a timer. The rows themselves are deleted
by ``taled.db.forget``; checkpoints, workspaces and the learning engine's memory by
their own services.
"""
