"""``python -m sureid.cli``: the ``sureid`` command without the console script."""

from . import main

raise SystemExit(main())
