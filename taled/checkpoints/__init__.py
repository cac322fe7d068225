"""Checkpoints: every task's states in a bare git repository (dulwich), and
their retention."""
