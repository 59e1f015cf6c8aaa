"""`fracture predict` reads DICOM through what `fracture.dicom` makes public, not its private helpers."""

from __future__ import annotations

import ast
import inspect

import fracture.predict


def test_predict_imports_no_private_name_of_the_product():
    """fracture.predict read earlier reports through fracture.dicom._parse, a private helper that
    fracture.dicom may rename or change without a word to its callers. It now uses parse_bytes, the
    public bounded read that fracture.dicom documents for every reader of DICOM it did not write."""
    tree = ast.parse(inspect.getsource(fracture.predict))
    private = [
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fracture")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private == []
    from fracture.dicom import parse_bytes

    assert "max_inflated" in (parse_bytes.__doc__ or "")
