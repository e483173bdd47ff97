"""blobchain's Celery adapter (distributed mode).

- :mod:`blobchain.tasks.app`: ``make_app(settings)`` and the ``celery -A blobchain.tasks.app`` app;
- :mod:`blobchain.tasks.layer_tasks`: the ``build_ref`` and ``finalize_chain`` tasks;
- :mod:`blobchain.tasks.startup`: a worker's start-up (its stores, pool size, janitor);
- :mod:`blobchain.tasks.poison`, :mod:`.janitor`, :mod:`.timing`, :mod:`.errors`: crash
  counting, takeover, time budgets, errors through the result backend;
- :mod:`blobchain.tasks.canvas`: a chain as one flat chord;
- :mod:`blobchain.tasks.submit`: ``CeleryExecutor`` / ``CeleryJob`` for the client;
- :mod:`blobchain.tasks.worker`: ``run_worker`` behind ``blobchain worker``.

Nothing is imported here: ``import blobchain.tasks`` opens no connection and needs no settings.
"""
