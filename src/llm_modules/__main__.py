"""`python -m llm_modules ...` is `llm-modules ...` (what `accelerate launch -m llm_modules` runs)."""

import sys

from .cli import main

sys.exit(main())
