"""What the command-line tools share: help that keeps the docstring's layout and shows every
default once, arguments checked as they are parsed, and the rule that user mistakes end as one
line on stderr with exit code 2 (no usage block, no traceback), and Ctrl-C ends a tool with
one line and exit code 130.

    if __name__ == "__main__":
        sys.exit(cli.run(main))
"""

import argparse
import math
import os
import signal
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the module docstring as written, and '(default: ...)' after every option
    whose help does not already say its default in words."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line, as every other user mistake is."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class UsageError(ValueError):
    """A command line that cannot work (flags that do not go together, a path that cannot be
    used); the message, one line, says what to change. The CLIs end with it and exit code 2."""


def number(kind, low=None, high=None, *, above=None, below=None):
    """An argparse type: a finite int or float within [low, high] (or (above, below), open).

    e.g. type=number(float, above=0) for a learning rate, number(int, low=0) for a count."""
    if low is not None and high is not None:
        wanted = f"from {low} to {high}"
    elif (low, above) != (None, None) and (high, below) != (None, None):
        wanted = (f"[{low}" if low is not None else f"({above}") + ", " \
            + (f"{high}]" if high is not None else f"{below})")
        wanted = f"in {wanted}"
    else:
        wanted = next(f"{sign} {bound}" for sign, bound in
                      ((">=", low), (">", above), ("<=", high), ("<", below)) if bound is not None)

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number: give one {wanted}")
        if ((low is not None and value < low) or (above is not None and value <= above)
                or (high is not None and value > high) or (below is not None and value >= below)):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a number {wanted}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def path(what):
    """An argparse type: a path, refused when empty (`--out "$UNSET"` in a script), which would
    otherwise mean the current folder to some calls and nothing to others."""
    def parse(text):
        if not text.strip():
            raise argparse.ArgumentTypeError(f"an empty path: give {what}")
        return text

    parse.__name__ = "path"
    return parse


def plural(n, word, words=None):
    """'1 class', '3 classes': a count with its noun."""
    return f"{n} {word if n == 1 else words or word + 's'}"


def user_error(message):
    """Print a user mistake as one line and return the exit code for it."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def run(main):
    """main() as `python -m` runs it: its exit code, or after Ctrl-C one line and 130 (128 +
    SIGINT), where Python would print a traceback. (train handles Ctrl-C itself: it saves.)"""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_loading:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # main() takes Ctrl-C now
    try:
        return main()
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the output piped into a reader that stopped (`| head`): no
        # traceback, and nothing more to write (Python's own flush at exit would fail again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a writer its reader left


def guard_loading():
    """Under `python -m t2t_ref...`, a Ctrl-C while the command's modules still load (NumPy,
    SciPy, the model: a few tenths of a second before run() is there to catch it) ends it with
    the same one line and 130, not a traceback from the middle of an import. Called first by
    the package's __init__; run() puts Python's own handler back."""
    command = getattr(sys, "orig_argv", [])
    if "-m" not in command[:-1] or \
            command[command.index("-m") + 1].split(".")[0] != "t2t_ref":
        return  # imported by a program of its own: its Ctrl-C is left alone
    try:
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _interrupted_while_loading)
    except ValueError:  # not the main thread
        pass


def _interrupted_while_loading(signum, frame):
    print("\ninterrupted (Ctrl-C)", file=sys.stderr)
    raise SystemExit(130)


class LineByLine:
    """A stderr for tqdm that writes each refresh of a bar as a line of its own. Under mpirun
    a rank's output reaches the terminal a line at a time, so a bar redrawn in place (carriage
    returns, no newline) would show nothing until it ends: an epoch without any progress."""

    def __init__(self, file=None):
        self.file = file

    def write(self, text):
        text = text.replace("\r", "").rstrip()
        if text:  # (a bar that clears itself writes only spaces)
            (self.file or sys.stderr).write(text + "\n")

    def flush(self):
        (self.file or sys.stderr).flush()


def progress_options(mpi):
    """tqdm's file and refresh interval: in place, as usual; under MPI a line every 30 s."""
    return dict(file=LineByLine(), mininterval=30.0) if mpi else {}
