"""The exceptions of the export; both say what to change."""


class ExportError(RuntimeError):
    """The export cannot be done as asked; the message says what to change."""


class ExportVerificationError(ExportError):
    """The written folder does not reproduce the model; it must not be used."""
