"""The ``losskit`` command line: ``losskit list``, ``losskit bench`` and ``losskit docs``."""

from __future__ import annotations

import argparse
import json
import sys

from losskit import registry
from losskit.bench.cli import add_bench_parser
from losskit.docs import add_docs_parser


def _cmd_list(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="losskit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("list", help="print the registry (objectives, weighters, optimizers, schedulers, recipes, ...)")
    pl.add_argument("--json", action="store_true", help="emit the registry as JSON")
    pl.add_argument("--family", default=None, choices=sorted(registry.FAMILIES))
    pl.add_argument("--kind", default="all", choices=["all", *registry.KINDS],
                    help="only entries of this kind (default: every kind)")
    pl.set_defaults(func=_cmd_list)
    add_bench_parser(sub)
    add_docs_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
