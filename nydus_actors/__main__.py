"""`python -m nydus_actors` runs the command line."""

from nydus_actors.cli import main

raise SystemExit(main())
