"""Fuzz harnesses for the code that reads untrusted input (issue 12).

``targets`` holds the seed corpora, the mutators and the property checks; it needs neither
hypothesis nor atheris, so ``benchmarks/fuzz.py`` drives the same checks for longer runs.
``strategies`` turns the mutators into hypothesis strategies for the bounded tests here.
"""
