"""The `llm-edge-proxy` command: `llm-edge-proxy usage` (edge.budgets.report). The service
itself runs as `gunicorn -c gunicorn.conf.py`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

COMMANDS = {"usage": "each key's spend, tokens, requests and budget this period"}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        listed = "\n".join(f"  {name:8} {what}" for name, what in COMMANDS.items())
        print(f"usage: llm-edge-proxy COMMAND [options]\n\ncommands:\n{listed}", file=sys.stderr)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    from edge.budgets import report

    try:
        return report.main(args[1:])
    except BrokenPipeError:  # `llm-edge-proxy usage | head`: the reader left, nothing to say
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
