"""Parameter importance (docs/design.md §6).

- :mod:`.selectors`: the registry of selectors, one module each;
- :mod:`.scores`: computing scores, aggregating them by layer / kind / head, and turning them into
  masks under a budget;
- :mod:`.evaluation`: agreement of selectors and how well they predict a real update;
- :mod:`.calibration`: the calibration batches data-driven selectors read.
"""
