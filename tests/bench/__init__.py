"""Benchmarks run by hand (``python3 -m tests.bench.pull_bench``); pytest does not collect them.

Modules:

* :mod:`.proctree` -- CPU time and resident memory of a process and its descendants.
* :mod:`.load` -- load generators: a lean blob downloader and a ``wrk`` wrapper.
* :mod:`.nginx` -- nginx serving blob files, the "how fast can it go" reference.
* :mod:`.pull_bench` -- mirror vs distribution's proxy mode vs nginx.
* :mod:`.gc_bench` -- gc, eviction, fsck and manifest GETs/s on a synthetic store of 100k objects.
"""
