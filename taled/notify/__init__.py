"""Telling people: desktop notifications and hooks when a task ends or waits for them.

    store.watch ─► service.py (Notifications: a committed state change of a top-level
                   task, or a step's that waits for a person, becomes a Notice)
                       ├─► desktop.py (org.freedesktop.Notifications.Notify, D-Bus)
                       └─► hooks.py   (the user's command, the notice as JSON on stdin,
                                       in the sandbox)
    notice.py      what a Notice is: its kind, its JSON form, its words

Each arrow is a bounded queue read by one background task: nothing here ever makes
the runner, the store's writer or a person's request wait, and a full queue drops
with a line in the log.
"""
