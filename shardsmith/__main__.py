"""``python -m shardsmith ...`` is the ``shardsmith`` command."""

from shardsmith.jobs.cli import main

raise SystemExit(main())
