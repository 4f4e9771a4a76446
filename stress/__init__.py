"""Stress tests that run for minutes, outside the pytest suite: ``python -m stress.churn``."""
