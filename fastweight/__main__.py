import sys

from fastweight.cli import main

sys.exit(main())
