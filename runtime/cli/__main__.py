"""`python -m diptych.cli`: the same as the `diptych` command."""

from .main import main

raise SystemExit(main())
