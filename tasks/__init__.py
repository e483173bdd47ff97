"""blobchain's Celery adapter (distributed mode).

- :mod:`blobchain.tasks.app`: ``make_app(settings)`` and the ``celery -A blobchain.tasks.app`` app;
- :mod:`blobchain.tasks.layer_tasks`: the ``build_ref`` and ``finalize_chain`` tasks;
- :mod:`blobchain.tasks.canvas`: a chain as one flat chord;
- :mod:`blobchain.tasks.submit`: ``CeleryExecutor`` / ``CeleryJob`` for the client;
- :mod:`blobchain.tasks.worker`: ``run_worker`` behind ``blobchain worker``.

Nothing is imported here: ``import blobchain.tasks`` opens no connection and needs no settings.
"""
