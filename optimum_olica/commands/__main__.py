"""``python -m optimum_olica.commands prune|eval|inspect ...``: the ``optimum-cli olica`` command line."""

from .olica import main

main()
