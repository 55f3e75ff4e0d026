"""`python -m bench [--runs N] [--burst M]`: run the benchmarks and print their figures."""

import sys

from bench import latency

if __name__ == "__main__":
    latency.main(sys.argv[1:])
