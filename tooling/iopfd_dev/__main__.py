import sys

from iopfd_dev.cli import main

sys.exit(main())
