import sys

from lfm2audio_server.cli import main

sys.exit(main())
