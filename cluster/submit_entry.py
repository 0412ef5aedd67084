"""What `ray submit CLUSTER.yaml cluster/submit_entry.py -- <raydistill args>` runs on the head node.

It runs the raydistill CLI (the one installed on the node) with the given arguments, joining the running cluster:
`--address auto` is added to distill/boost/tune when no --address is given (a resumed run keeps its own config, so
there it goes through RAY_ADDRESS instead), and `--in-process`, which would bypass the cluster, is refused.
Exits with the CLI's code.
"""

from __future__ import annotations

import os
import sys

JOINS_A_CLUSTER = ("distill", "boost", "tune")  # the subcommands that take --address


def _has_address(args: list[str]) -> bool:
    return any(a == "--address" or a.startswith("--address=") for a in args)


def cluster_args(argv: list[str]) -> list[str]:
    """The CLI arguments to run: `argv` (a leading `--` dropped) joined to the cluster this node belongs to."""
    args = list(argv[1:] if argv[:1] == ["--"] else argv)
    if not args or args[0] not in JOINS_A_CLUSTER or _has_address(args):
        return args
    if args[0] in ("distill", "boost") and any(a == "--resume" or a.startswith("--resume=") for a in args):
        os.environ.setdefault("RAY_ADDRESS", "auto")  # the CLI refuses --address with --resume
        return args
    return args + ["--address", "auto"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--in-process" in argv:
        print("submit_entry: error: --in-process runs without Ray, so it would not use the cluster; drop it",
              file=sys.stderr)
        return 2
    try:
        from raydistill.cli import main as raydistill_main  # the installed package (pinned in the cluster files)
    except ImportError as exc:
        print(f"submit_entry: error: raydistill is not installed on this node ({exc}); install the same wheel on "
              "every node (cluster/README.md, step 1) or use a cluster file from cluster/", file=sys.stderr)
        return 2
    return raydistill_main(cluster_args(argv))


if __name__ == "__main__":
    sys.exit(main())
