"""The worker's settings, one place: each is an environment variable on the worker host (or a
``WorkerSettings`` trait), listed with its help by ``celery-nb worker --help-all``.
The client never sets them: a client may ask, the worker's settings decide.
"""
from __future__ import annotations

import os
import ssl

from traitlets import Bool, Enum, Float, Int, Unicode, default

from celery_nb.config import EnvConfigurable

# where Linux distributions keep the system's CA bundle, for hosts whose Python names none
_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")


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
        10_000, help="Jobs a container runs before it is replaced (its replacement starts in the background while "
                     "it serves on, so that no job waits for it; a replacement costs about 0.2 s of CPU, and the "
                     "process kept for a kernel's jobs there, with what they imported).",
    ).tag(config=True, env="CELERY_NB_POOL_MAX_JOBS")
    orphan_interval = Float(
        10.0, help="Seconds between two looks for containers of dead worker processes on this host (a worker "
                   "killed mid-job leaves them behind); a worker that takes over a dead worker's job looks at "
                   "once.",
    ).tag(config=True, env="CELERY_NB_ORPHAN_INTERVAL")

    # -- big data (celery_nb.shm, celery_nb.worker.handover) --------------------------------
    kernel_shared_memory = Bool(
        True, help="Exchange big payloads and results with kernels on this host through shared memory files "
                   "(/dev/shm), mapped on both sides, instead of the blob store (Redis, S3); off: as if every "
                   "kernel were on another host.",
    ).tag(config=True, env="CELERY_NB_KERNEL_SHARED_MEMORY")

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

    # -- per-job environments: --pip, --requirements (celery_nb.worker.environments) --------
    allow_pip = Bool(
        True, help="Build environments for jobs that ask for packages (--pip, --requirements); off refuses them "
                   "with a PolicyError.",
    ).tag(config=True, env="CELERY_NB_ALLOW_PIP")
    pip_index_url = Unicode(
        "", help="The package index builds install from, e.g. https://packages.example.com/simple (unset: uv's "
                 "default, PyPI).",
    ).tag(config=True, env="CELERY_NB_PIP_INDEX_URL")
    pip_extra_index_url = Unicode(
        "", help="More package indexes for builds, separated by spaces, asked after the index.",
    ).tag(config=True, env="CELERY_NB_PIP_EXTRA_INDEX_URL")
    build_ca_bundle = Unicode(
        help="CA certificates (a PEM file on the worker host) that builds trust when they download packages, "
             "e.g. a company's TLS-intercepting proxy's; empty: uv's own roots. Default: the worker host's "
             "CA bundle.",
    ).tag(config=True, env="CELERY_NB_BUILD_CA_BUNDLE")
    env_cache_size = Int(
        10, min=1, help="Environments kept on this host; beyond it the least recently used ones that no container "
                 "uses are removed after each build.",
    ).tag(config=True, env="CELERY_NB_ENV_CACHE_SIZE")

    @default("build_ca_bundle")
    def _host_ca_bundle(self) -> str:
        """The CA bundle this host's own TLS clients use, so that a build trusts what the host
        trusts: the one its environment names for them, else OpenSSL's, else the usual places."""
        named = [os.environ.get(name) for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT")]
        paths = ssl.get_default_verify_paths()
        candidates = (*named, paths.cafile, paths.openssl_cafile, *_CA_BUNDLES)
        return next((path for path in candidates if path and os.path.isfile(path)), "")
