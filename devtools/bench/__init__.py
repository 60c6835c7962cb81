"""``make bench``: what VRS does on this machine, printed beside the ceiling measured in the same run.

One module per area (``records``, ``gateway``, ...), each runnable as ``python -m devtools.bench.<area>``;
``python -m devtools.bench`` runs them all, one after another.
"""
