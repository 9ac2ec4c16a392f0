"""`spillover bench`: end-to-end speed and memory through the engine, on real or synthetic weights.

synthetic.py builds any config with random weights directly in its served format; run.py drives
the engine's request path and reports prefill / decode tok/s, time to first token and memory. The
`bench/` folder at the repository root keeps the kernel sweeps.
"""
