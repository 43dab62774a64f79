"""Orchestration: convert (options in, report out), operating point, sweep, plot."""
