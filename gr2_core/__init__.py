"""GR2 algorithms as plain typed functions: no Prefect, no MLflow in this package."""
