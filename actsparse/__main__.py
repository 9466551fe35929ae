"""`python -m actsparse ...` is the `actsparse` command."""

from .cli import main

raise SystemExit(main())
