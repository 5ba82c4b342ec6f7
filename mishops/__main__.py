import sys

from mishops.cli import main

sys.exit(main())
