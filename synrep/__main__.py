import sys

from synrep.cli import main

sys.exit(main())
