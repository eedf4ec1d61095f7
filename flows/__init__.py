"""Prefect flows (composition only) and the `gr2` command line."""
