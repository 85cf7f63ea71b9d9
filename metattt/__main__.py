"""``python -m metattt SUBCOMMAND ...``: dispatch to the subcommand's module.

Each subcommand lives in its own module exposing ``main(argv: list[str] | None) -> int | None``; it is
imported only when invoked (so ``compare`` never pulls in torch). To add a subcommand, add one line to
``SUBCOMMANDS``: name → (module, one-line help).
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "compare": ("metattt.track.compare_cli", "compare run directories: mean ± CI over seeds, paired deltas, plots"),
    "adapters": ("metattt.ttt.registry", "list the TTT adapters with their hyper-parameters and defaults"),
    "import-pg": ("metattt.interop.import_pg", "a Parameter Golf record model (final_model.pt / .int6.ptz) as an artifact"),
    "export-pg": ("metattt.interop.export_pg", "an artifact as the record script's final_model.pt"),
}


def usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = ["usage: python -m metattt SUBCOMMAND [args...]", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in sorted(SUBCOMMANDS.items())]
    lines += ["", "python -m metattt SUBCOMMAND --help for its options"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    rc = module.main(rest)
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
