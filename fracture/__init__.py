"""Bone-fracture classification on X-rays: data, training, evaluation and registry logic.

Every pipeline stage lives here as plain functions; the CLI (:mod:`fracture.cli`), DVC and the
Prefect flows only call them.
"""

__version__ = "0.1.0"
