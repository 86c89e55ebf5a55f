"""The one exception type users see as a message rather than a traceback."""


class UserError(Exception):
    """Something in the user's input is wrong (config, data, paths).

    The message says what was wrong and what to do; the CLI prints it on one line and exits 2.
    """
