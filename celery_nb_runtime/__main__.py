import sys

from celery_nb_runtime.runner import main

sys.exit(main(sys.argv))
