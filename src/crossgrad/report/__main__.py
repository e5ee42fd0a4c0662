import sys

from crossgrad.report import main

sys.exit(main())
