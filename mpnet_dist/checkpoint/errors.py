"""The one exception checkpoint writing and reading raise for problems a user can fix."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says what to do instead."""
