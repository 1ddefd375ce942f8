"""One training loop (loop) with one set of hooks (hooks) and a metrics journal (journal), run in
this process (local) or on Ray Train workers (ray_train).
"""
