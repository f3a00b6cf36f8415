"""The exceptions of the export; both say what to change."""

from mpnet_dist.errors import UserError


class ExportError(UserError, RuntimeError):
    """The export cannot be done as asked; the message says what to change."""


class ExportVerificationError(ExportError):
    """The written folder does not reproduce the model; it must not be used."""
