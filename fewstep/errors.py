"""The error types of fewstep (a leaf module: it imports nothing of fewstep).

Library code raises these with messages that name config fields (``model.teacher``, ``method.phases``);
the command line turns a ``ConfigError`` into one ``error:`` line and exit code 2.
"""


class ConfigError(ValueError):
    """A bad configuration value, preset, override, input file or output directory (exit code 2).

    The message stays one line even when it quotes user input holding line breaks."""

    def __init__(self, message: str):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class NonFiniteError(RuntimeError):
    """Raised after ``train.max_nonfinite`` consecutive updates with a non-finite loss or gradient."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (disk full, permissions, corrupt file)."""
