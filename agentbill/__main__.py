"""``python -m agentbill``: the same command line as the ``agentbill`` console script."""

from agentbill.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
