import sys

from iopfd.cli import main

sys.exit(main())
