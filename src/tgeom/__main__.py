"""``python -m tgeom`` runs the command line."""

from tgeom.cli import main

main()
