"""``python -m reporting_endpoint``: the same command line as ``reporting-endpoint``."""

from reporting_endpoint.cli import main

raise SystemExit(main())
