"""The server's one error hierarchy. Every error the server answers with is a `DLError`
(or a subclass defined beside the code that raises it: `protocol.ProtocolError`,
`model.OptionError`, `weights.WeightsError`, `cuda_graphs.CaptureFailed`), each with a
stable `code` (docs/protocol.md lists them) and a message that tells a person what to do.
`describe_error` turns any exception into the (code, message) of an error reply.
Stdlib only."""

from __future__ import annotations

import errno
import logging
import traceback
from typing import Any, Tuple

log = logging.getLogger("dlserver")


class DLError(Exception):
    """Root of the errors the server replies with."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def reply_message(self, model: Any) -> str:
        """The message of the error reply to a request for `model`."""
        return self.message


class UnknownModel(DLError):
    code = "unknown_model"


class BadRequest(DLError):
    code = "bad_request"


class BadFrame(DLError):
    code = "bad_frame"


class PathRefused(DLError):
    code = "forbidden_path"


class ModelFailed(DLError):
    """The model's own code raised (load, infer): the message names the model."""

    code = "model_error"


class IOFailed(DLError):
    """Reading or writing a file on the server failed (disk full, permissions, ...):
    neither the model's fault nor the client's request."""

    code = "io_error"


class InternalError(DLError):
    code = "internal_error"


class Cancelled(DLError):
    code = "cancelled"


class OutOfMemory(DLError):
    code = "out_of_memory"


class VersionMismatch(DLError):
    code = "version_mismatch"


class Busy(DLError):
    """The server refuses a connection: too many open, or too many not logged in."""

    code = "busy"


class ReportedError(DLError):
    """An error another process of the server answered a frame with (a worker process,
    a Ray replica): that process's code and message, passed on as they are."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def io_failed(exc: BaseException, path: Any, doing: str = "write") -> IOFailed:
    """An IOFailed for an OSError (or a library's I/O RuntimeError) on `path`, saying
    what to do about it."""
    number = getattr(exc, "errno", None)
    text = str(exc)
    if number in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or \
            "quota" in text.lower():
        advice = "free space on that disk (or raise the quota), or choose another folder"
    elif number == errno.EFBIG or "File too large" in text:
        advice = ("the file is larger than this server may write (ulimit -f, or the "
                  "file system's limit): raise the limit or choose another folder")
    elif number in (errno.EACCES, errno.EPERM, errno.EROFS) or "ermission" in text:
        advice = "check that the server's user may write there, or choose another folder"
    else:
        advice = "check the disk and the folder, then try again"
    reason = getattr(exc, "strerror", None) or text
    return IOFailed(f"cannot {doing} {str(path)!r}: {reason}; {advice}")


def describe_error(exc: BaseException, model: Any) -> Tuple[str, str]:
    """(code, message) of the error reply for any exception. The model's own exceptions
    reach here already as ModelFailed (inference wraps them); an OSError is the disk's;
    anything else is a fault of the server, logged with its traceback."""
    if isinstance(exc, DLError):
        return exc.code, exc.reply_message(model)
    if isinstance(exc, OSError):
        failed = io_failed(exc, exc.filename or "a file", "read or write")
        return failed.code, failed.message
    log.error("request for model %r failed in the server:\n%s", model,
              "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return InternalError.code, (f"the server failed on this request ({type(exc).__name__}: "
                                f"{exc}); its log has the details: please report it")
