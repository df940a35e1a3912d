"""The exception types users catch: a checkpoint or config that cannot be honoured, a file that cannot be
written, a SIGTERM turned into an exception so that cleanups run."""

import re


class CheckpointError(ValueError):
    """A checkpoint directory, file, tensor or config field is missing, malformed or unsupported.

    The message always names the file / tensor / field and says what was expected.
    """


class WriteError(OSError):
    """A file could not be written (a full disk, a read-only folder); the message names the file and the
    reason in one line. Raised after whatever was half-written has been removed."""

    def __init__(self, path, error: BaseException, note: str = ""):
        self.path = path
        if isinstance(error, WriteError):
            reason = error.reason
        else:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        # safetensors' wording: "... I/O error: No space left on device (os error 28)"
        m = re.search(r"(?:I/O error: |message: \")([^\"(]+?)\s*(?:\(os error \d+\)|\")", reason)
        self.reason = m[1] if m else reason
        super().__init__(f"{path}: cannot write ({self.reason}){note}")

    def __str__(self) -> str:
        return self.args[0]


class Terminated(BaseException):
    """SIGTERM arrived while a command was writing (points.io.atomic.sigterm_raises); exit status 143 when
    uncaught by the command line."""
