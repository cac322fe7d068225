"""Schedules: tasks that run later (``tale submit --at``) or again (``--every``).

``timing`` reads the times people give and computes the next one (cron via croniter,
wall-clock time in a zone via zoneinfo); ``clock`` is the time the scheduler reads and
sleeps on (tests bring their own); ``service`` creates, pauses, resumes and deletes
schedules and runs the scheduler. What is stored is ``taled.db.schedules``'.
"""
