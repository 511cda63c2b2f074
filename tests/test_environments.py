"""Per-job environments for real: packages installed from the package index into images that have
no pip (local/py311: python3 and nothing else), built once per host and cached, by separate worker
processes and the embedded worker; failures, `--pip auto`, the version tables, the policy, and
`celery-nb envs`."""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import docker
import numpy as np
import pytest

from celery_nb import Client, EnvironmentBuildError, InputError, JobCancelled, OutputError, PythonVersionError
from celery_nb.options import JobOptions
from celery_nb.requirements import cell_modules, function_modules, pin_auto
from celery_nb.worker.environments import (LABEL_BUILD, LABEL_ENVIRONMENT, LABEL_REQUIREMENTS, REPOSITORY, VOLUME,
                                           list_environments)
from tests.conftest import (IMAGE, NUMPY_IMAGE, NUMPY_PIP, OTHER_PYTHON_IMAGE, ROOT, job_statuses, remove_environments,
                            start_worker, stop_process)
from tests.kernel import Kernel

INICONFIG_VERSION = "import importlib.metadata, iniconfig\nv = importlib.metadata.version('iniconfig')\n"
PROBE = "import sys, numpy, tqdm\nversions = (numpy.__version__, tqdm.__version__)\nprefix = sys.prefix\n" \
        "try:\n    import pip\n    has_pip = True\nexcept ImportError:\n    has_pip = False\n"


def environment_images(docker_client: docker.DockerClient, requirements: str) -> list:
    """The environment images of this host that hold exactly ``requirements``."""
    wanted = "\n".join(sorted(requirements.split()))
    return [image for image in docker_client.images.list(filters={"label": LABEL_ENVIRONMENT})
            if image.labels.get(LABEL_REQUIREMENTS) == wanted]


def environment_dirs(docker_client: docker.DockerClient) -> set[str]:
    """The directories in the volume of the host's environments."""
    listing = docker_client.containers.run(
        IMAGE, ["python3", "-c", "import os; print(*os.listdir('/celery-nb/envs'), sep='\\n')"], remove=True,
        volumes={VOLUME: {"bind": "/celery-nb", "mode": "ro"}})
    return set(listing.decode().split())


def test_pip_installs_into_an_image_without_pip(client: Client) -> None:
    job = client.submit_cell(PROBE, {}, image=IMAGE, pip=NUMPY_PIP)
    out = job.result(timeout=300)
    assert all(version[0].isdigit() for version in out["versions"])
    assert out["prefix"].startswith("/celery-nb/envs/")  # uv's environment ...
    assert out["has_pip"] is False  # ... with no pip either
    assert job.environment in ("built", "cached") and job.status == "succeeded"


def test_a_cache_hit_runs_warm_in_its_own_containers_and_says_so(redis_client: Client,
                                                                docker_client: docker.DockerClient) -> None:
    redis_client.submit_cell(PROBE, {}, image=IMAGE, pip=NUMPY_PIP).result(timeout=300)  # built or found
    job = redis_client.submit_cell("import tqdm\nv = tqdm.__version__\n", {}, image=IMAGE, pip=NUMPY_PIP)
    assert job.result(timeout=60)["v"]
    assert job.environment == "cached" and job.container == "warm"
    assert "building" not in job_statuses(redis_client, job.id) and "build" not in job.timing_breakdown()
    assert "environment cached" in job.summary()
    # (a host may keep environments of the same requirements that an earlier recipe built)
    environments = {image.id for image in environment_images(docker_client, NUMPY_PIP)}
    warm = [c for c in docker_client.containers.list(filters={"label": f"celery_nb.worker={job.worker}"})
            if c.image.id in environments]
    assert warm, "no warm container of the environment's image"  # the pool keys containers by environment
    mount, = warm[0].attrs["Mounts"]
    assert mount["Name"] == VOLUME and mount["RW"] is False  # the environments are mounted read-only


def test_an_image_of_another_python_gets_its_environment_from_that_python(
        redis_client: Client, docker_client: docker.DockerClient) -> None:
    # uv reads a Python older than 3.10 through distutils, which Debian's python3 3.9 lacks unless
    # python3-distutils is installed: such an image gets a clear refusal, others their environment
    probe = "import sys\ntry:\n    import distutils.sysconfig\nexcept ImportError:\n    sys.exit(sys.version_info < (3, 10))"
    try:
        docker_client.containers.run(OTHER_PYTHON_IMAGE, ["python3", "-W", "ignore", "-c", probe], remove=True)
        usable = True
    except docker.errors.ContainerError:
        usable = False
    job = redis_client.submit_cell("import sys, iniconfig\nversion = list(sys.version_info[:2])\n", {},
                                   image=OTHER_PYTHON_IMAGE, pip="iniconfig==1.1.1")
    if usable:
        out = job.result(timeout=300)
        assert out["version"] != [3, 11] and out["version"] >= [3, 9]  # made from the image's own Python
    else:
        with pytest.raises(EnvironmentBuildError, match="uv needs distutils in the Python of image"):
            job.result(timeout=300)


def test_a_job_without_network_still_gets_its_environment(client: Client) -> None:
    out = client.submit_cell("import os, numpy\ninterfaces = sorted(os.listdir('/sys/class/net'))\n", {},
                             image=IMAGE, pip=NUMPY_PIP, network="none").result(timeout=300)
    assert out == {"interfaces": ["lo"]}  # the build had the network, the job has none


@pytest.fixture
def two_workers(redis_url: str) -> Iterator[list[subprocess.Popen]]:
    workers = [start_worker(redis_url, f"envs{n}", f"envs{n}", concurrency=1) for n in (1, 2)]
    yield workers
    for worker in workers:
        stop_process(worker)


def test_two_first_builds_at_once_build_once(two_workers: list, redis_client: Client,
                                             docker_client: docker.DockerClient, redis_url: str) -> None:
    requirements = "iniconfig==2.0.0"
    remove_environments(docker_client, requirements)
    since = time.time()
    jobs = [redis_client.submit_cell(INICONFIG_VERSION, {}, image=IMAGE, pip=requirements, queue=queue)
            for queue in ("envs1", "envs2")]
    assert [job.result(timeout=300)["v"] for job in jobs] == ["2.0.0", "2.0.0"]
    assert {job.worker.split("@")[0] for job in jobs} == {"envs1", "envs2"}  # two worker processes
    builds = docker_client.events(since=since, until=time.time(), decode=True,
                                  filters={"type": "container", "event": "create", "label": LABEL_BUILD})
    assert len(list(builds)) == 1  # one build container for the two jobs
    logs = sorted(job.logs for job in jobs)
    assert sum("building it for image" in log for log in logs) == 1
    assert sum("another worker on this host is building this environment" in log for log in logs) == 1
    assert all("building" in job_statuses(redis_client, job.id) and job.environment == "built" for job in jobs)
    assert all("build" in job.timing_breakdown() for job in jobs)

    stop_process(two_workers[0])  # environments outlive the workers that built them
    two_workers[0] = start_worker(redis_url, "envs1", "envs1", concurrency=1)
    again = redis_client.submit_cell("import iniconfig\nv = 1\n", {}, image=IMAGE, pip=requirements, queue="envs1")
    assert again.result(timeout=60) == {"v": 1}
    assert again.environment == "cached" and "building" not in job_statuses(redis_client, again.id)


@pytest.mark.parametrize("requirements, named, installer", [
    ("celery-nb-no-such-package-3f9a", "celery-nb-no-such-package-3f9a", "was not found in the package registry"),
    ("iniconfig==0.0.1", "iniconfig==0.0.1", "there is no version of iniconfig==0.0.1"),
    ("iniconfig==1.1.1 iniconfig==2.0.0", "iniconfig==1.1.1 iniconfig==2.0.0", "unsatisfiable"),
])
def test_a_bad_requirement_fails_naming_it_and_leaves_nothing_behind(
        redis_client: Client, docker_client: docker.DockerClient, requirements: str, named: str,
        installer: str) -> None:
    directories = environment_dirs(docker_client)
    job = redis_client.submit_cell("ran = True\n", {}, image=IMAGE, pip=requirements)
    with pytest.raises(EnvironmentBuildError) as failure:
        job.result(timeout=300)
    message = str(failure.value)
    assert f"the environment for image '{IMAGE}' with {named} could not be built" in message
    assert installer in message and "No solution found" in message  # uv's own lines
    assert "fix the requirement" in message
    assert "ran" not in job.logs and job.status == "failed"
    assert not environment_images(docker_client, requirements)  # nothing half-built in the cache
    assert environment_dirs(docker_client) == directories  # the failed build removed its directory
    assert not docker_client.containers.list(all=True, filters={"label": LABEL_BUILD})


@pytest.fixture(scope="module")
def worker_with_unreachable_index(redis_url: str) -> Iterator[subprocess.Popen]:
    proc = start_worker(redis_url, "noindex", "noindex", env={"CELERY_NB_PIP_INDEX_URL": "http://127.0.0.1:9/simple"})
    yield proc
    stop_process(proc)


def test_an_unreachable_index_is_said_so(worker_with_unreachable_index: subprocess.Popen,
                                         redis_client: Client) -> None:
    job = redis_client.submit_cell("ran = True\n", {}, image=IMAGE, pip="iniconfig", queue="noindex")
    with pytest.raises(EnvironmentBuildError) as failure:
        job.result(timeout=300)
    message = str(failure.value)
    assert "could not reach the package index (http://127.0.0.1:9/simple)" in message
    assert "Connection refused" in message  # uv's own line


def test_cancelling_a_job_stops_the_build_of_its_environment(worker_with_unreachable_index: subprocess.Popen,
                                                             redis_client: Client,
                                                             docker_client: docker.DockerClient) -> None:
    job = redis_client.submit_cell("ran = True\n", {}, image=IMAGE, pip="iniconfig==1.1.1", queue="noindex")
    deadline = time.monotonic() + 60
    while job.status != "building":  # uv retries the index that does not answer for seconds
        assert time.monotonic() < deadline and not job.finished, job.status
        time.sleep(0.05)
    job.cancel()
    cancelled = time.monotonic()
    with pytest.raises(JobCancelled):
        job.result(timeout=30)
    assert time.monotonic() - cancelled < 3
    assert not docker_client.containers.list(all=True, filters={"label": LABEL_BUILD})  # the build was stopped


@pytest.fixture(scope="module")
def kernel(docker_client: docker.DockerClient) -> Iterator[Kernel]:
    k = Kernel({"CELERY_NB_DEFAULT_IMAGE": IMAGE})
    assert k.run("%load_ext celery_nb").error() is None
    yield k
    k.shutdown()


def test_in_a_notebook_a_failed_build_leaves_the_namespace_and_a_fixed_spec_works(kernel: Kernel) -> None:
    kernel.run("keep = 'before'")
    ex = kernel.run("%%celery_docker --pip celery-nb-no-such-package-3f9a\nkeep = 'after'\n")
    error = ex.error()
    assert error["ename"] == "EnvironmentBuildError" and "celery-nb-no-such-package-3f9a" in error["evalue"]
    assert any(">building environment<" in v for v in ex.html_values())  # the widget's phase
    assert kernel.run("print(keep)").stream_text() == "before\n"
    ex = kernel.run(f'%%celery_docker --pip "{NUMPY_PIP}"\nimport tqdm\nkeep = tqdm.__version__\n')
    assert ex.error() is None
    assert kernel.run("print(keep != 'before')").stream_text() == "True\n"


def test_a_requirements_file_is_read_in_the_kernel(kernel: Kernel, tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "base.txt").write_text("tqdm  # progress bars\n")
    (tmp_path / "requirements.txt").write_text("# what the cell needs\nnumpy\n-r base.txt\n")
    ex = kernel.run(f"%%celery_docker --requirements {tmp_path}/requirements.txt\n"
                    "import numpy, tqdm\nboth = bool(numpy.__version__ and tqdm.__version__)\n")
    assert ex.error() is None
    assert kernel.run("print(both)").stream_text() == "True\n"
    assert any("environment cached" in v or "environment built" in v for v in ex.html_values())


def test_auto_pins_what_a_cell_imports_and_an_explicit_pin_wins() -> None:
    modules = cell_modules("import numpy as np\nimport os, json\nfrom pandas import DataFrame\n"
                           "import celery_nb_runtime\nfrom . import nothing\n", 1, [np.ones(2)])
    options = pin_auto(JobOptions(pip="auto numpy==1.26.4"), lambda: modules)
    assert options.pip[0] == "numpy==1.26.4" and "auto" not in options.pip
    pinned = dict(spec.split("==") for spec in options.pip[1:])
    assert pinned["pandas"] == importlib.metadata.version("pandas")  # the kernel's version
    assert pinned["python-dateutil"] == importlib.metadata.version("python-dateutil")  # pandas' dependency
    assert "numpy" not in pinned  # the explicit pin won
    assert not {"os", "json", "celery-nb", "celery-nb-runtime", "cloudpickle"} & set(pinned)


def test_auto_finds_what_a_function_uses() -> None:
    import six as alias

    def helper():
        import yaml  # noqa: F401
        return alias.PY3, np.ones(1)

    found = function_modules(helper, [np.int64(3)])
    assert {"six", "yaml", "numpy"} <= found


def test_auto_gives_a_function_the_kernels_versions(client: Client) -> None:
    import six

    def version():
        return six.__version__

    job = client.submit(version, image=IMAGE, pip="auto")
    assert job.result(timeout=300) == importlib.metadata.version("six") and job.environment in ("built", "cached")


def test_a_value_the_environment_cannot_load_shows_both_versions_and_the_fix(redis_client: Client) -> None:
    # the kernel's numpy 2 pickles arrays as numpy._core, which the image's Debian numpy 1.24 lacks
    kernel_numpy = importlib.metadata.version("numpy")
    job = redis_client.submit_cell("total = float(m.sum())\n", {"m": np.ones(3)}, image=NUMPY_IMAGE)
    with pytest.raises(InputError) as failure:
        job.result(timeout=60)
    message = str(failure.value)
    assert "input variable 'm' could not be loaded in the container" in message
    row = next(line.split() for line in message.splitlines() if line.strip().startswith("numpy "))
    assert row[:3] == ["numpy", kernel_numpy, "1.24.2"] and "differs" in row[-1]
    assert "--pip auto" in message and f'--pip "numpy=={kernel_numpy}"' in message
    fixed = redis_client.submit_cell("total = float(m.sum())\n", {"m": np.ones(3)}, image=NUMPY_IMAGE, pip="auto")
    assert fixed.result(timeout=300) == {"total": 3.0}  # the fix the message gives works


def test_a_result_the_kernel_cannot_load_shows_both_versions(redis_client: Client) -> None:
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("toposort")  # not in the kernel: what the container returns cannot load here
    job = redis_client.submit_cell("import toposort\nfailure = toposort.CircularDependencyError({1: {2}})\n", {},
                                   image=IMAGE, pip="toposort", outputs=["failure"])
    with pytest.raises(OutputError) as failure:
        job.result(timeout=300)
    message = str(failure.value)
    row = next(line.split() for line in message.splitlines() if line.strip().startswith("toposort "))
    assert row[:2] == ["toposort", "-"] and row[2][0].isdigit()  # not in the kernel, the environment's version
    assert f"pip install toposort=={row[2]}" in message


def test_a_function_for_another_python_shows_both_versions(client: Client) -> None:
    with pytest.raises(PythonVersionError) as failure:
        client.submit(len, [1, 2], image=OTHER_PYTHON_IMAGE).result(timeout=60)
    row = next(line.split() for line in str(failure.value).splitlines() if line.strip().startswith("python "))
    assert row[:2] == ["python", "3.11"] and row[2] != "3.11"
    assert "use an image with Python 3.11" in str(failure.value)


def envs(*args: str, env: dict[str, str] | None = None) -> str:
    run = subprocess.run([sys.executable, "-m", "celery_nb.worker.cli", "envs", *args], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_envs_list_and_prune_least_recently_used_first_never_in_use(
        redis_client: Client, docker_client: docker.DockerClient) -> None:
    older, newer = "iniconfig==1.1.1", "iniconfig==2.0.0"
    for requirements in (older, newer):
        remove_environments(docker_client, requirements)
    held = redis_client.submit_cell("import time\ntime.sleep(60)\n", {}, image=IMAGE, pip=older, fresh=True)
    deadline = time.monotonic() + 120
    while held.status != "running":
        assert time.monotonic() < deadline and not held.finished, held.status
        time.sleep(0.1)  # its environment is in use while it runs
    redis_client.submit_cell("v = 1\n", {}, image=IMAGE, pip=newer, fresh=True).result(timeout=300)
    listed = envs("list")
    older_image, = environment_images(docker_client, older)
    newer_image, = environment_images(docker_client, newer)
    assert re.search(rf"^{REPOSITORY}:\w+ +{IMAGE} +3\.11\.\d+ .* 1 +{re.escape(older)}$", listed, re.M), listed
    assert re.search(rf" 0 +{re.escape(newer)}$", listed, re.M), listed  # in use: 1 container, and none
    for image in docker_client.images.list(filters={"label": LABEL_ENVIRONMENT}):  # all others: used later
        if image.id not in (older_image.id, newer_image.id):
            for tag in image.tags:
                docker_client.api.tag(image.id, *tag.split(":"))
    count = len(list_environments(docker_client))
    removed = envs("prune", env={**os.environ, "CELERY_NB_ENV_CACHE_SIZE": str(count - 1)})
    held.cancel()
    held.wait(30)
    assert environment_images(docker_client, older), removed  # least recently used, but in use: kept
    assert not environment_images(docker_client, newer), removed  # the next least recently used went
    assert f"removed {newer_image.tags[0]}" in removed


def test_jobs_of_one_new_environment_on_one_worker_build_it_once(embedded_client: Client,
                                                                 docker_client: docker.DockerClient) -> None:
    requirements = "iniconfig==1.1.1"
    remove_environments(docker_client, requirements)
    since = time.time()
    jobs = [embedded_client.submit_cell("import iniconfig\n", {}, image=IMAGE, pip=requirements) for _ in range(3)]
    for job in jobs:
        job.result(timeout=300)
    builds = docker_client.events(since=since, until=time.time(), decode=True,
                                  filters={"type": "container", "event": "create", "label": LABEL_BUILD})
    assert len(list(builds)) == 1
