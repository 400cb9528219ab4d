"""``python -m slimdiff_diffusers`` is the ``slimdiff`` command (so ``torchrun -m slimdiff_diffusers ...`` works)."""
import sys

from .cli import main

sys.exit(main())
