"""``python -m galore_plus.app finetune ...`` (the form ``torchrun -m`` needs)."""

from .cli import main

raise SystemExit(main())
