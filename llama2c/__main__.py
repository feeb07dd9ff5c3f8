"""`python -m llama2c ...`: the same command line as the `llama2c` script."""
from .cli import main

raise SystemExit(main())
