"""Allow ``python -m qconv``."""

from qconv.cli import main

main()
