"""`python -m pipeline` is the same CLI as `mmclip`."""
from pipeline.cli import main

raise SystemExit(main())
