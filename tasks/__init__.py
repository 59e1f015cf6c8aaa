"""Prefect tasks: thin wrappers that run the DVC stages and read their outputs back."""
