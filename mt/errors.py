"""The one error type users see: `MTError` is printed by the CLI as a single line, exit code 2."""


class MTError(Exception):
    """A problem with the user's input (file, key, value), reported without a traceback."""
