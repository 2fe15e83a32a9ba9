"""`python -m mt.cli ...`: the `mt` command."""
from mt.cli import main

main()
