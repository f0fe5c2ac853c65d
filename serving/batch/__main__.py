"""`python -m serving.batch` (serving/batch/cli.py)."""
import sys

from serving.batch.cli import main

sys.exit(main())
