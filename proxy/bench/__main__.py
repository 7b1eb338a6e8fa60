"""``python -m proxy.bench``: see the package docstring."""

from .cli import main

main()
