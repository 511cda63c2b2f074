"""The worker side: the Celery app, the task, Docker and the worker's policy."""
