"""``sureid zoo`` and ``sureid push``: the model zoo and the Hub."""

from __future__ import annotations

import argparse


def _cmd_zoo(args: argparse.Namespace) -> int:
    """The model zoo: the table of checkpoints, or one entry's commands (``zoo show ID``)."""
    from ..zoo import format_entry, format_zoo_table, get_entry

    if args.zoo_command == "show":
        print(format_entry(get_entry(args.id), data_root=args.data_root))
    else:
        print(format_zoo_table())
        print("\nsureid zoo show ID prints an entry's commands; docs/zoo.md explains the statuses")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    """Upload a checkpoint folder (weights and model card) to the Hugging Face Hub."""
    from ..zoo import push_checkpoint

    info = push_checkpoint(args.model, args.repo_id, private=args.private, revision=args.revision)
    url = getattr(info, "commit_url", None) or str(info)
    revision = f", revision={args.revision!r}" if args.revision else ""
    print(f"pushed {args.model} to {args.repo_id}: {url}")
    print(f"load it with SureidModel.from_pretrained({args.repo_id!r}{revision})")
    return 0


def add_parsers(sub) -> None:
    """Parser entries of zoo and push."""
    zoo = sub.add_parser("zoo", help="the model zoo: the paper's checkpoints and the demo's")
    zoo_sub = zoo.add_subparsers(dest="zoo_command")
    show = zoo_sub.add_parser("show", help="one entry and its training commands, ready to paste")
    show.add_argument("id", help="a zoo id, e.g. sureid-deit-occduke")
    show.add_argument(
        "--data-root", default=None, help="put this folder in the commands instead of /data"
    )
    zoo.set_defaults(func=_cmd_zoo)

    push = sub.add_parser(
        "push", help="upload a checkpoint folder (weights and model card) to the Hugging Face Hub"
    )
    push.add_argument("--model", required=True, help="checkpoint folder (with README.md)")
    push.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.add_argument("--revision", default=None, help="branch to upload to (default: main)")
    push.set_defaults(func=_cmd_push)
