"""peft_fast's benchmark suites, installed as the package `peft_fast_bench` (setup.py maps
this folder), so `peft-fast bench` runs them from an installed peft_fast too.

timing.py   medians (CUDA events / interleaved CPU rounds) and the JSON record every run writes
lora.py, ia3.py, sgmv.py   the per-op suites; main.py   the `peft-fast bench` front end

The library never imports this package; it imports the library.
"""
