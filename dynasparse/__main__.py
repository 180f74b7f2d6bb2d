import sys

from dynasparse.cli import main

sys.exit(main())
