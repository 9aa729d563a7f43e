import sys

from cogumi.cli import main

sys.exit(main())
