"""Modules of the pyhast benchmark (``bench/run.py``).

* :mod:`.parse`: pure functions (fio JSON, medians, ratios, targets, log lines);
* :mod:`.procs`: every process the benchmark starts, pinned and cleaned up;
* :mod:`.hast`: a light two-node hastd launcher;
* :mod:`.fio`: fio command lines (nbd engine, loop devices);
* :mod:`.rawcopy`: the file -> TCP loopback -> file baseline of the resync;
* :mod:`.report`: the stdout table, results.md and chart.png.
"""
