"""Acting: the tools a task's model may call, where they act, and who may allow them.

``base`` holds the values every part shares (a tool's spec, a call, a result);
``workspace`` the task's own copy of a directory; ``worktree`` that copy as a git
worktree on branch ``tale/<id>`` for a repository; ``builtin`` the built-in tools;
``mcp_client`` the user's MCP servers; ``policy`` the allow/ask/deny rules.
"""
