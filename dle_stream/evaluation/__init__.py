"""Evaluation, apart from the streaming path: the seeded benchmark suites of
``dle-stream bench`` (:mod:`.bench`, :mod:`.bench_combine`), the tracking oracle
(:mod:`.oracle`) and the accuracy and calibration metrics they report (:mod:`.metrics`,
also used by the trainer's validation). Nothing on the path from a source to the log
imports this package (docs/design.md, "Where a frame goes")."""
