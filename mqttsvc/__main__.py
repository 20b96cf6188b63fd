import sys

from mqttsvc.cli import main

sys.exit(main())
