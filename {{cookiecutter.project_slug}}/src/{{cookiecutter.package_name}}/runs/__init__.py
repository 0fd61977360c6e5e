"""Runs: the command line, run folders and the last-checkpoint logic, export."""
