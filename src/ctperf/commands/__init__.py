"""CLI subcommands, one module each.

Every module defines ``ORDER`` (its place in ``ctperf --help``) and ``register(subparsers)``, which
adds its parser and sets ``func`` to a ``run(args) -> int`` function. Modules import only argparse
and the standard library at top level; heavy imports happen inside ``run`` so ``--help`` is instant.
"""
