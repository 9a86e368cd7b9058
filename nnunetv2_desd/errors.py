class DesdError(Exception):
    """A problem with the user's input. Command-line tools print its message alone and exit with code 2."""
