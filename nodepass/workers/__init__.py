"""Worker processes for the master's instances (``master://...?workers=N``).

A master with workers keeps the API, SSE, state and key in its own process
and runs its instances in ``N`` child processes, so a busy tunnel takes a
core of its own instead of starving the others and the API.  The master
speaks AMP to each child over a pair of pipes (:mod:`.commands` is the
vocabulary); :mod:`.child` is the program a worker runs and :mod:`.pool`
the master's side.  Tunnel bytes never pass through the master.
"""
