"""`python -m peft_fast_bench ...` is `peft-fast bench ...`."""

from .main import main

raise SystemExit(main())
