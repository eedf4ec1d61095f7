"""Contracts for everything that crosses a stage boundary.

- `tables`: pandera-polars schemas for the tables stages exchange (interactions, items, users,
  sequences, candidate slates, metrics), and `ContractError`, which names the file, the column and
  the rows of every problem found at once.
- `config`: the validated pydantic configuration, one model per stage, composed into
  `PipelineConfig` (the Prefect flow's parameter).
- `manifest`: the record each stage writes last, which makes its output "complete".
"""
