import sys

from celery_nb_runtime.runner import serve

sys.exit(serve())
