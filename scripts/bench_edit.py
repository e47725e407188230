"""Benchmark: Pix2Video edit vs plain depth-to-image per frame (same as `p2v bench`)."""

import sys

from p2v_runtime.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
