"""`python -m pipeline <stage>`: the one entry point of every stage."""

from pipeline.cli import main

raise SystemExit(main())
