"""``cpsample`` / ``python -m cpsample_fast``: dispatch to one module per subcommand.

Each subcommand module (``cpsample_fast/cli/<name>.py``) exposes ``HELP``,
``add_arguments(parser)`` and ``main(args) -> int`` (docs/CONTRACTS.md "Command line").

Bad input never ends in a traceback: an argparse error, or a ``ValueError`` / ``TypeError`` /
``FileNotFoundError`` / ``NotADirectoryError`` raised by a subcommand (the package's bad-input
errors), is printed as one line ``cpsample <command>: <message>`` and the exit status is 2.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module name (docs/ALGORITHM.md §5: at least demo, train-protector, sample,
# evaluate, bench)
SUBCOMMANDS = {
    "demo": "demo",
    "train-protector": "train_protector",
    "sample": "sample",
    "evaluate": "evaluate",
    "bench": "bench",
    "tune": "tune",
}


# The exception types the package raises for bad input (docs/CONTRACTS.md "Bad input").
BAD_INPUT = (ValueError, TypeError, FileNotFoundError, NotADirectoryError)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block) with exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see --help)\n")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cpsample",
        description="CPSample: diffusion sampling that does not copy its training images.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(f"cpsample_fast.cli.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module, _name=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._module.main(args) or 0)
    except BAD_INPUT as err:
        message = str(err) or type(err).__name__
        print(f"cpsample {args._name}: {_one_line(message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
