"""``python -m tfpretrain <command> ...``: the same as the ``tfpretrain`` console command."""
import sys

from tfpretrain.cli import main

sys.exit(main())
