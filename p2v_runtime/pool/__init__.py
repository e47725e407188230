"""``p2v serve --ray``: the server's jobs run on a pool of Ray actors, one per device.

- ``pool.py`` (in the server process): joins or starts the Ray cluster, keeps the actors, queues
  jobs in arrival order, hands idle actors the inversions of running jobs, replaces dead actors
  and moves their job to another actor.
- ``board.py``: one job's shared state, a small Ray actor every actor of the pool reaches: its
  frames (refs into Ray's object store), the inversions it needs (pending, taken, done) and its
  cancel flag.
- ``actor.py``: the actor: the sequential edit of one job (``edit_clip``, streamed back), and
  single inversions of any running job.
- ``shared.py``: the editor's view of the board's inversions (``editor.SharedInversions``).

The server process itself never imports torch: only the actors compute.
"""
