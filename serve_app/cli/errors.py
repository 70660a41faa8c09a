"""The one-line failures of the `raycache` command and their exit codes.

| code | meaning |
|---|---|
| 0 | done |
| 1 | done only in part: a replica did not acknowledge, a line or request failed |
| 2 | bad command line (wrong option, missing argument, unreadable file) |
| 3 | the cluster is unreachable (nothing answers at `--url`, or it timed out) |
| 4 | refused credentials: no admin token or API key where one is needed, or a wrong one |
| 5 | the cluster refused the request (a 4xx naming the field) |
| 6 | the cluster failed (a 5xx) |
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    PARTIAL = 1
    USAGE = 2
    UNREACHABLE = 3
    CREDENTIALS = 4
    REFUSED = 5
    SERVER_ERROR = 6


class CliError(Exception):
    """A failure shown as one line (`raycache: error: <message>`) with its exit code."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
