import sys

from ctperf.cli import main

sys.exit(main())
