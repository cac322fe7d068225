"""Reporting: live metrics against the targets, recorded violations, the usage
report."""
