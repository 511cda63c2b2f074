"""The worker's settings, one place: each is an environment variable on the worker host (or a
``WorkerSettings`` trait), listed with its help by ``celery-nb worker --help-all``.
The client never sets them: a client may ask, the worker's settings decide.
"""
from __future__ import annotations

from traitlets import Bool, Enum, Float, Int, Unicode

from celery_nb.config import EnvConfigurable


class WorkerSettings(EnvConfigurable):
    """What a celery_nb worker allows and how it keeps its containers."""

    # -- policy: what jobs may ask for (celery_nb.worker.policy) --------------------------
    allowed_images = Unicode(
        "*", help="Images jobs may use: comma-separated fnmatch patterns, e.g. 'python:3.1*,ghcr.io/acme/*'.",
    ).tag(config=True, env="CELERY_NB_ALLOWED_IMAGES")
    default_memory = Unicode(
        "2g", help="Memory limit of a job that names none (capped by max_memory).",
    ).tag(config=True, env="CELERY_NB_DEFAULT_MEMORY")
    max_memory = Unicode(
        None, allow_none=True, help="Largest memory limit a job may ask for, e.g. 8g (unset: no maximum).",
    ).tag(config=True, env="CELERY_NB_MAX_MEMORY")
    max_cpus = Float(None, allow_none=True, help="Most CPUs a job may ask for (unset: no maximum).").tag(
        config=True, env="CELERY_NB_MAX_CPUS")
    max_timeout = Float(
        None, allow_none=True, help="Longest --timeout in seconds; also the timeout of jobs that name none.",
    ).tag(config=True, env="CELERY_NB_MAX_TIMEOUT")
    pids_limit = Int(512, help="Processes per container.").tag(config=True, env="CELERY_NB_PIDS_LIMIT")
    pull = Enum(["missing", "never"], "missing", help="Pull images missing on this host (missing), or never.").tag(
        config=True, env="CELERY_NB_PULL")
    networks = Unicode(
        "bridge,none", help="Network modes jobs may ask for with --network, comma-separated; the first is the "
                            "default ('none' alone: no job has a network).",
    ).tag(config=True, env="CELERY_NB_NETWORKS")
    read_only = Bool(False, help="Read-only root filesystem for jobs, with a writable tmpfs /tmp.").tag(
        config=True, env="CELERY_NB_READ_ONLY")
    user = Unicode(None, allow_none=True, help="Run jobs as this user, e.g. 65534:65534 (unset: the image's).").tag(
        config=True, env="CELERY_NB_USER")
    gpus = Unicode(
        "0", help="GPUs a job may ask for with --gpus: 'all', a number, or 0 for none (every request refused).",
    ).tag(config=True, env="CELERY_NB_GPUS")
    mounts = Unicode(
        "", help="Host folders jobs may ask for by name with --mount NAME, mounted at /mnt/NAME: comma-separated "
                 "NAME=HOST_PATH:ro or :rw, e.g. 'datasets=/srv/datasets:ro,scratch=/srv/scratch:rw' (ro when the "
                 "mode is left out). Unset: none; a job never names a host path itself.",
    ).tag(config=True, env="CELERY_NB_MOUNTS")

    # -- the warm pool (celery_nb.worker.pool) --------------------------------------------
    pool_size = Int(4, help="Idle containers kept per (image, limits); 0 turns the warm pool off.").tag(
        config=True, env="CELERY_NB_POOL_SIZE")
    pool_idle_timeout = Float(300.0, help="Seconds before an idle container is removed.").tag(
        config=True, env="CELERY_NB_POOL_IDLE_TIMEOUT")
    pool_max_jobs = Int(
        100, help="Jobs a container runs before it is replaced (its replacement starts in the background while "
                  "it serves on, so that no job waits for it).",
    ).tag(config=True, env="CELERY_NB_POOL_MAX_JOBS")
    orphan_interval = Float(
        10.0, help="Seconds between two looks for containers of dead worker processes on this host (a worker "
                   "killed mid-job leaves them behind); a worker that takes over a dead worker's job looks at "
                   "once.",
    ).tag(config=True, env="CELERY_NB_ORPHAN_INTERVAL")

    # -- what a job keeps of its output (celery_nb.worker.logs) ---------------------------
    max_log_bytes = Int(
        4 << 20, help="Bytes of a job's output its event stream keeps (and a kernel's Job.logs): the first half "
                      "as it comes, then a window of the newest; what lies between is dropped, and one line says "
                      "how much and where the whole log is.",
    ).tag(config=True, env="CELERY_NB_MAX_LOG_BYTES")
    max_full_log_bytes = Int(
        32 << 20, help="The whole log of a job whose output overflows max_log_bytes is kept, compressed, up to "
                       "this many bytes (Job.full_log() reads it); 0: not kept.",
    ).tag(config=True, env="CELERY_NB_MAX_FULL_LOG_BYTES")
    full_log_ttl = Int(3600, help="Seconds a whole log (max_full_log_bytes) is kept.").tag(
        config=True, env="CELERY_NB_FULL_LOG_TTL")
