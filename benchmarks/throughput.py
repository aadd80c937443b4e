"""Print the throughput table quoted in docs/benchmarks.md (a thin shell over sureid.benchmark).

    python benchmarks/throughput.py --threads 2                  # CPU, batch 32, the full table
    python benchmarks/throughput.py --batch-size 1 32 128        # one table per batch size
    python benchmarks/throughput.py --device cuda --dtype float16 --compile --cuda-graphs

Options are those of ``sureid benchmark`` (``--help`` lists them).
"""

from __future__ import annotations

import argparse
import sys

from sureid.benchmark import add_arguments, command_line, main_from_args


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        return main_from_args(args, command_line(args, "python benchmarks/throughput.py"))
    except (ValueError, FileNotFoundError) as err:  # SureidError is a ValueError
        print(f"throughput.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
