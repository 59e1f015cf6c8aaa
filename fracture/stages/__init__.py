"""One module per pipeline stage: ``run_<stage>(params, workspace) -> <Stage>Result``.

Each function reads its inputs and writes its outputs through :class:`fracture.workspace.Workspace`
and returns the typed record it wrote. No Prefect or command-line parsing here: ``fracture.cli``
parses and calls them, ``dvc.yaml`` runs the CLI, and the Prefect tasks run the DVC stages and
read the records back through the same workspace.
"""
