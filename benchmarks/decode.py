"""Same as `llm-modules bench decode` (options: --help); docs/performance.md shows the command and its table.

The code lives in llm_modules.benchmarking, so the installed command and this script measure the same thing.
"""

import sys

from llm_modules.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))
