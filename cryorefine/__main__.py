import sys

from cryorefine.cli import main

sys.exit(main())
