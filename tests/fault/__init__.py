"""Randomized fault runs, split-brain scenarios and their regressions (issue 5)."""
