"""Hit ratios of eviction policies over a trace: `raycache simulate` run as a benchmark.

    python -m benchmarks.simulate --trace PATH --capacities N[,N...] [--policies a,b,...]
                                  [--json OUT] [--plot OUT.png]

The simulator is `cluster.simulation.simulate`; this module only names it for the benchmarks.
"""

from __future__ import annotations

import sys

from cluster.simulation.simulate import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m benchmarks.simulate"))
