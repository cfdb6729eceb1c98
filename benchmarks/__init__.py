"""The benchmarks behind `aevb bench ...` (`python -m benchmarks ...` in a checkout).

Not part of the installed package: they sit on top of it, like its users. Each benchmark
returns one JSON-ready dict; docs/benchmarks.md records the commands and their figures.
Timings on small shared machines move by 10-20% from run to run, so every benchmark that
compares two things alternates them inside one call and reports medians and their ratio.
"""
