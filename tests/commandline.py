"""``conduit`` command lines parsed as the real command parses them, without running anything.

``conduit engine ...`` and ``conduit models build-tiny ...`` are the engine's own program
(``python -m engines``, engines/cli.py): ``gateway.cli.main`` runs it in its place, so their
flags are the engine parser's.
"""

from __future__ import annotations

import argparse

from engines.cli import build_parser as engine_parser
from gateway.cli import build_parser, engine_command

#: The engine program's subcommands, by the ``conduit`` subcommand that runs each.
CONDUIT_NAMES = {"serve": "engine", "build-tiny": "models"}


def parse_conduit(argv: list[str]) -> argparse.Namespace:
    """``conduit argv``'s arguments (``command``: the ``conduit`` subcommand, ``engine`` for an engine)."""
    command = engine_command(argv)
    if command is None:
        return build_parser().parse_args(argv)
    args = engine_parser().parse_args(command[4:])
    args.command = CONDUIT_NAMES[args.command]
    return args
