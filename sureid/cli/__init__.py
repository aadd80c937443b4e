"""The ``sureid`` command: a thin shell over the library. Subcommands grow with the project.

Errors a user can cause and fix (a bad path, a corrupt file, a wrong value) print one line,
``sureid <command>: error: ...``, and exit with status 2; ``--debug`` (anywhere on the line) or
``SUREID_DEBUG=1`` lets them through with their traceback. Other exceptions are bugs and keep
their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


def _cmd_train(args: argparse.Namespace) -> int:
    """Train a teacher or distil a student: the same recipe as examples/train_*.py."""
    from .train import train_main

    train_main(args.rest, role=args.role)
    return 0


def _add_train_parser(sub) -> None:
    """``sureid train ROLE [options]``: the options are the recipe's (``cli.train``), parsed
    when the command runs (``--help`` after the role lists them)."""
    train = sub.add_parser(
        "train", help="train a teacher or distil a student (options: sureid train teacher --help)"
    )
    train.add_argument("role", choices=("teacher", "student"))
    train.add_argument("rest", nargs=argparse.REMAINDER, help="the recipe's options")
    train.set_defaults(func=_cmd_train)


def build_parser() -> argparse.ArgumentParser:
    """The ``sureid`` parser: one subcommand module each (demo, train, models, inference, zoo,
    track)."""
    from .. import __version__
    from . import demo, index, inference, models, track, zoo

    parser = argparse.ArgumentParser(prog="sureid", description="Occluded person ReID with HTS.")
    parser.add_argument("--version", action="version", version=f"sureid {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (also SUREID_DEBUG=1; may follow the command)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(sub)
    _add_train_parser(sub)
    models.add_parsers(sub)
    inference.add_parsers(sub)
    index.add_parsers(sub)
    zoo.add_parsers(sub)
    track.add_parsers(sub)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause and fix: a bad path, a corrupt file, a wrong value, a missing extra.

    SureidError is a ValueError; config checks raise ValueError; a missing file, a folder that
    is not a checkpoint, the Hub unreachable raise OSError; a damaged weights file raises
    safetensors' own error (which derives from neither).
    """
    from safetensors import SafetensorError

    return (ValueError, OSError, ImportError, SafetensorError)


def _one_line(err: BaseException, args: argparse.Namespace) -> str:
    """The error's message on one line, with library hints put in CLI terms."""
    text = str(err) or type(err).__name__
    if "on_error='skip'" in text:
        from ..inference import SKIP_HINT

        flag = "(pass --skip-errors to leave bad inputs out and list them)"
        text = text.replace(SKIP_HINT, flag if hasattr(args, "skip_errors") else "").strip()
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sureid`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SUREID_DEBUG", "") not in ("", "0")
    parser = build_parser()
    args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])
    if extra and not getattr(args, "forwards_options", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra  # the options a command parses itself (sureid benchmark)
    if debug:
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"sureid {args.command}: interrupted", file=sys.stderr)
        return 130
    except _expected_errors() as err:
        print(
            f"sureid {args.command}: error: {_one_line(err, args)} (--debug for the traceback)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
