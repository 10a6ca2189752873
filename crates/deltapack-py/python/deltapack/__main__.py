"""``python -m deltapack``: the deltapack command line."""

from deltapack._cli import main

main()
