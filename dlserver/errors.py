"""Errors the server answers with. Each has a stable `code` (docs/protocol.md lists them)
and a message that tells a person what to do. Stdlib only."""

from __future__ import annotations


class DLError(Exception):
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownModel(DLError):
    code = "unknown_model"


class BadRequest(DLError):
    code = "bad_request"


class BadFrame(DLError):
    code = "bad_frame"


class PathRefused(DLError):
    code = "forbidden_path"


class ModelFailed(DLError):
    code = "model_error"


class Cancelled(DLError):
    code = "cancelled"


class OutOfMemory(DLError):
    code = "out_of_memory"


class VersionMismatch(DLError):
    code = "version_mismatch"
