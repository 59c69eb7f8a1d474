"""Scale-out on Ray: :mod:`.serve` (live sessions as a Ray Serve application, resumable on any replica).

Nothing here is imported by the rest of streamvlm; it needs the ``ray`` extra (``pip install 'streamvlm[ray]'``).
"""
