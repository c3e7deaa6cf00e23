"""The tests' support package: one of each thing the suites need and share.

- ``support.redis``: a redis-server of the tests' own on a free 127.0.0.1 port (``RedisServer``,
  ``free_port``).
- ``support.procs``: processes the way users start them (``fedq_cmd``, ``cli_env``, ``Proc``),
  and finding and killing a command's whole process tree and sessions (``Tracker``,
  ``kill_tree``).
- ``support.wait``: ``wait_until(cond, what, timeout)``, the one polling loop.
- ``support.federation``: ``Federation``, a run with an in-process aggregator thread and clients
  that push updates directly (the round protocol without training), and ``federation_factory``.
- ``support.trainer``: ``FakeTrainer``, a stand-in for Keras that trains nothing and returns
  chosen weights.
- ``support.initial``: a run's initial model stored with it as its submitter stores it
  (``store_initial``), so that no aggregator builds it in a child importing TensorFlow, and
  ``PrestoredFederation``, a ``Federation`` whose run comes with it.
- ``support.data``: the seed's hemodialysis CSVs when they are available, iris as a CSV
  (``iris_csv``) and an earlier run's outputs (``stale_outputs``).

Nothing here is a test; test modules import from here, never from each other.
"""
