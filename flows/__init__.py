"""Prefect flows of the fracture pipeline."""
