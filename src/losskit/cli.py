"""The ``losskit`` command line: ``losskit list``, ``losskit bench``, ``losskit eval`` and ``losskit docs``.

Start-up is kept light: this module imports nothing heavy at import time, and
only the parser of the command being run is built in full (``losskit --help``
and ``losskit --version`` import neither torch nor the registry).
"""

from __future__ import annotations

import argparse
import json
import sys

from losskit import __version__

#: the commands and their one-line help (the light parser lists them without importing them)
COMMANDS = {
    "list": "print the registry (objectives, weighters, optimizers, schedulers, recipes, ...)",
    "bench": "train with each objective and compare them (default task: embeddings on held-out classes)",
    "eval": "evaluate a bench run's saved networks on another protocol (e.g. Omniglot 20-way one-shot)",
    "docs": "regenerate the registry tables in docs/*.md (or --check that they are current)",
}


def _cmd_list(args: argparse.Namespace) -> int:
    from losskit.core import registry

    rows = registry.specs(family=args.family, kind=None if args.kind == "all" else args.kind)
    if args.json:
        print(json.dumps([s.to_json() for s in rows], indent=2))
        return 0
    print(format_table(rows))
    return 0


def _show(v) -> str:
    """A default as a person reads it (a function by its name, not its address)."""
    if callable(v) and hasattr(v, "__qualname__"):
        return v.__qualname__
    return repr(v)


def format_table(rows) -> str:
    """The registry as a plain-text table (also used for the docs)."""
    head = ("name", "kind", "family", "paper", "hyperparameters (defaults)")
    body = []
    for s in rows:
        paper = f"{s.paper.title[:48]} ({s.paper.year})" if s.paper else "-"
        hp = ", ".join(f"{k}={_show(v)}" for k, v in s.hparams.items() if k != "reduction")
        req = ", ".join(s.required)
        body.append((s.name, s.kind, s.family, paper, "; ".join(p for p in (req, hp) if p)))
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in [head, *body]]
    lines.insert(1, "-" * min(140, len(lines[0])))
    return "\n".join(lines)


def _add_list(sub) -> None:
    from losskit.core import registry

    pl = sub.add_parser("list", help=COMMANDS["list"])
    pl.add_argument("--json", action="store_true", help="emit the registry as JSON")
    pl.add_argument("--family", default=None, choices=sorted(registry.FAMILIES))
    pl.add_argument("--kind", default="all", choices=["all", *registry.KINDS],
                    help="only entries of this kind (default: every kind)")
    pl.set_defaults(func=_cmd_list)


def _add_bench(sub) -> None:
    from losskit.bench.cli import add_bench_parser

    add_bench_parser(sub)


def _add_eval(sub) -> None:
    from losskit.bench.evaluate import add_eval_parser

    add_eval_parser(sub)


def _add_docs(sub) -> None:
    from losskit.docs import add_docs_parser

    add_docs_parser(sub)


_ADD = {"list": _add_list, "bench": _add_bench, "eval": _add_eval, "docs": _add_docs}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command`` given: only that command's subparser is built in full (the
    others are listed by name and help), ``None``: all of them."""
    p = argparse.ArgumentParser(prog="losskit", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"losskit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, help_text in COMMANDS.items():
        if command is None or command == name:
            _ADD[name](sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else "").parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
