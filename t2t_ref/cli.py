"""What the command-line tools share: help that keeps the docstring's layout and shows every
default, and the rule that user mistakes end as one line on stderr with exit code 2."""

import argparse
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the module docstring as written, and '(default: ...)' after every option."""


def user_error(message):
    """Print a user mistake as one line and return the exit code for it."""
    print(f"error: {message}", file=sys.stderr)
    return 2
