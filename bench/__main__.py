"""`python -m bench`: run every benchmark and print its table."""

from bench import latency

if __name__ == "__main__":
    latency.main()
