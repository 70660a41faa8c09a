"""The `raycache` command line: an operator's view of a running cluster over its HTTP API.

`raycache status`, `publish`, `invalidate`, `warm`, `bench` and `simulate`; see `main.py` for
the commands and `errors.py` for the exit codes.
"""
