"""The one exception type users catch when a checkpoint or a config cannot be honoured."""


class CheckpointError(ValueError):
    """A checkpoint directory, file, tensor or config field is missing, malformed or unsupported.

    The message always names the file / tensor / field and says what was expected.
    """
