"""What every script does with a mistake a user can make: one `error:` line, exit code 2.

Library modules raise a UserError (or a subclass named for where it arose:
config.ConfigError, data.DataError, runs.RunError, ...) whose message names
the thing and what to do; scripts run their main through `run_main`.
"""
import argparse
import sys


class UserError(Exception):
    """The user can fix this; the message says what and how."""


def run_main(main, argv=None, errors=()):
    """main(argv)'s exit code; a UserError (or one of `errors`) is one `error:` line, exit 2."""
    try:
        return main(argv)
    except (UserError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the same one `error:` line and exit code 2 as every other mistake,
    instead of a usage block and `prog: error:`."""

    def error(self, message):
        print(f"error: {message}; see python {self.prog} --help", file=sys.stderr)
        sys.exit(2)
