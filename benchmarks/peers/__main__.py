import sys

from sfedge.benchmarks.peers.cli import main

sys.exit(main())
