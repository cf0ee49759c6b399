"""The exception raised for every data problem."""


class DataError(ValueError):
    """A data set, split, file, column or partition request is invalid or unavailable.

    The message names the offending value and the fix.
    """
