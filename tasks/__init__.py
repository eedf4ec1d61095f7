"""Thin Prefect tasks: resolve inputs from manifests, call gr2_core, validate, write, track."""
