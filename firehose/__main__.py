import sys

from firehose.cli import main

sys.exit(main())
