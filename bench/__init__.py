"""peft_fast's benchmark suites, installed as the package `peft_fast_bench` (setup.py maps
this folder), so `peft-fast bench` runs them from an installed peft_fast too.

timing.py            medians (CUDA events / interleaved CPU rounds) and the JSON record of a run
lora.py, ia3.py,     the op suites: ours vs bare frozen linear vs HF peft
sgmv.py
e2e.py               a training step of a Llama-shaped model
main.py              the `peft-fast bench` front end (also `python -m peft_fast_bench`)
report.py, ingest.py a GPU round's summary, and filing it into the repository
plot.py              the PNG of time ratios
gpu_round.sh         the whole GPU round in one call (not installed; see NOTES.md)

The library never imports this package; it imports the library.
"""
