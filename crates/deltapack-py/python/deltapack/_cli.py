"""The ``deltapack`` console script: the Rust CLI, run in this process."""

from __future__ import annotations

import sys

from deltapack import _native


def main() -> None:
    """Run the deltapack command line on ``sys.argv`` and exit with its status."""
    sys.exit(_native.cli_main(["deltapack", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
