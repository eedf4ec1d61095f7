"""CTC summarization (SPEC section 7): data, the order-preserving CTC summarizer, decoding,
baselines and metrics. Plain functions and modules; no Prefect, no MLflow."""
