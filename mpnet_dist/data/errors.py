"""The one exception the data pipeline raises for problems a user can fix."""

from mpnet_dist.errors import UserError


class DataError(UserError, ValueError):
    """Bad or missing input data, tokenizer or data state; the message says what to change."""
