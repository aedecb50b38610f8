"""``python -m hybridlm``: the same command as the ``hybridlm`` script."""

import sys

from hybridlm.cli import main

sys.exit(main())
