"""`python -m hdm_core.train CONFIG.toml --run-dir DIR` (also under torchrun); see hdm_core.train.loop.main."""

from hdm_core.train.loop import main

raise SystemExit(main())
