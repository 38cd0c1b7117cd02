import sys

from cloudach.cli import main

sys.exit(main())
