"""The sandbox: hostile code and commands run in a fenced-in process (kernel boundary).

Used by the done-gates (a model's Python code) and by the ``run`` tool (a command in
a task's workspace).
"""
