"""`python -m edgepipe …` runs the command line, like the `edgepipe` script."""

from edgepipe.cli import main

main()
