"""``python -m ke_fast run``: :func:`ke_fast.cli.main`, ended by :func:`ke_fast.cli.exit_fast`."""
from .cli import console

console()
