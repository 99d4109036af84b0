"""
# Register a model: import a pretrained network (or your own `.keras` file) into the registry

Triggered by hand (no schedule) with the form. Makes the model a new version of `model_name` under
`<workspace_uri>/models/`, which `nightly_inference` can then apply to photos (its `model_name`
Param).

* **`source = keras_application`:** a network of `keras.applications` (`application`, e.g.
  `InceptionV3`, or the small `MobileNetV3Small`) with `weights_uri`, the S3 URI of a
  `.weights.h5` file you saved on a machine with internet access:
  `keras.applications.InceptionV3(weights="imagenet").save_weights("inception_v3.weights.h5")`.
  Nothing downloads weights here: the network is built with `weights=None` and given your file.
* **`source = keras_file`:** `model_uri`, the S3 URI of your own `.keras` file. It must load in
  Keras safe mode with no Lambda layer, take raw pixels (0-255) with its preprocessing inside as
  layers, and have one fixed-size image input and one output of class scores.
* **`labels`:** `imagenet` (the 1000 ImageNet class names shipped with the package) or
  `label_map` with `label_map_uri` (a JSON list, a JSON object `{"0": "cat", ...}`, or a text file
  with one label per line): exactly one label per model output.
* **`resize_policy`:** `center_crop` for photos (keep the aspect ratio, resize the shorter side,
  cut out the centre; transparent pixels on white) or `resize` (plain resize, as the digit models).
* **`promote`:** make the new version the champion now (what `nightly_inference` uses by default),
  or only register it (pin it with `model_version`).

| task | what it does | XCom |
|---|---|---|
| `validate_params` | no Spark, no TensorFlow: refuses inconsistent Params, missing uploads and a label map of the wrong size for a stock network | the checked request |
| `register_model` | Spark job `jobs/register_model.py`: builds/loads the model, checks it loads in safe mode, takes uint8 pixels, fits its weights and labels, then writes the version (and moves the champion if asked) | version, URI, sha256, input shape, promoted |
| `check_registered` | fails the run with the reason when the job refused the model (nothing was registered) | the version summary |
| `mlflow` | only with an `mlflow_default` connection (or `MLFLOW_TRACKING_URI`), else skipped: the version as an MLflow model version and the `champion` alias where the S3 champion is (`sparktf.airflow.mlflow_tracking`); MLflow down never fails the run | what was and was not logged |

The version's `metadata.json` records the input shape, channels, resize policy, label names,
sha256 of the artifact and of the uploaded files, and where they came from.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from sparktf import applications
from sparktf.airflow.pipeline_settings import (
    DEFAULT_ARGS,
    REGISTRY_CONN_ID,
    model_name_param_spec,
    path_safe,
    workspace_param_spec,
)
from sparktf.airflow.spark_job_operator import SparkJobOperator, job_path

S3_OR_EMPTY = r"^(s3a?://[^/]+/.+)?$"

PARAMS = {
    "workspace_uri": Param(**workspace_param_spec("S3 prefix (no trailing slash) holding models/.")),
    "model_name": Param(**model_name_param_spec("inception-v3", "Registered name; a new name starts at version 1.")),
    "source": Param(
        "keras_application",
        type="string",
        enum=list(applications.SOURCES),
        title="Source",
        description="keras_application: a stock network + your weights file; keras_file: your .keras file.",
    ),
    "application": Param(
        "InceptionV3",
        type="string",
        enum=sorted(applications.APPLICATIONS),
        title="Network",
        description="keras.applications network (source keras_application).",
    ),
    "weights_uri": Param(
        "",
        type="string",
        pattern=r"^(s3a?://[^/]+/.+\.weights\.h5)?$",
        title="Weights file",
        description="S3 URI of the .weights.h5 file saved with model.save_weights (source keras_application).",
    ),
    "model_uri": Param(
        "", type="string", pattern=r"^(s3a?://[^/]+/.+\.keras)?$", title="Model file", description="S3 URI of your .keras file (source keras_file)."
    ),
    "labels": Param(
        "imagenet",
        type="string",
        enum=list(applications.LABEL_SOURCES),
        title="Labels",
        description="imagenet: the 1000 ImageNet class names shipped with the package; label_map: label_map_uri.",
    ),
    "label_map_uri": Param(
        "",
        type="string",
        pattern=S3_OR_EMPTY,
        title="Label map",
        description="S3 URI of a JSON list/object or a text file with one label per line (labels label_map).",
    ),
    "resize_policy": Param(
        "center_crop",
        type="string",
        enum=list(applications.RESIZE_POLICIES),
        title="Resize policy",
        description="center_crop: photos (aspect kept, centre cut out); resize: plain resize (digits).",
    ),
    "promote": Param(
        False, type="boolean", title="Make it the champion", description="Move the champion pointer to the new version (else only register it)."
    ),
}


@dag(
    dag_id="register_model",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=PARAMS,
    tags=["ml", "spark", "tensorflow", "registry"],
    doc_md=__doc__,
    user_defined_filters={"path_safe": path_safe},
    render_template_as_native_obj=False,
)
def register_model():
    @task(retries=1)
    def validate_params(params=None) -> dict:
        """Refuse bad Params before the Spark job starts (no TensorFlow here), saying what to fix."""
        from sparktf import storage
        from sparktf.airflow import aws_connection, validation

        request = validation.registration_request(params)
        problems = applications.check_request(request)
        if not problems:
            aws_connection.use_connection()
            problems = validation.upload_problems(request, storage.head, storage.read_bytes)
        validation.refuse(problems, "invalid parameters, nothing registered")
        return {**request, "promote": bool(params["promote"])}

    register = SparkJobOperator(
        task_id="register_model",
        application=job_path("register_model.py"),
        aws_conn_id=REGISTRY_CONN_ID,  # the one connection that may write models/ (pipeline_settings)
        application_args=[
            "--models-uri",
            "{{ params.workspace_uri }}/models/",
            "--model-name",
            "{{ params.model_name }}",
            "--source",
            "{{ params.source }}",
            # --flag=value: one argument even when the value is empty
            "--application={{ params.application }}",
            "--weights-uri={{ params.weights_uri }}",
            "--model-uri={{ params.model_uri }}",
            "--labels",
            "{{ params.labels }}",
            "--label-map-uri={{ params.label_map_uri }}",
            "--resize-policy",
            "{{ params.resize_policy }}",
            "--promote",
            "{{ 'true' if params.promote else 'false' }}",
            "--source-run",
            "{{ run_id }}",
            "--registered-at",
            "{{ dag_run.run_after.isoformat() }}",
        ],
    )

    @task
    def check_registered(result: dict) -> dict:
        """The registered version, or the job's refusal as this run's failure."""
        from sparktf.airflow import validation

        if not result.get("registered"):
            raise validation.failure(f"model {result.get('model_name')!r} was not registered: {result.get('refused')}")
        return result

    @task(task_id="mlflow")
    def track_in_mlflow() -> dict:
        """Register the version in MLflow and sync its champion alias with S3's when configured (skipped otherwise; never fails)."""
        from sparktf.airflow import mlflow_tracking

        return mlflow_tracking.run_task("register")

    validate_params() >> register
    check_registered(register.output) >> track_in_mlflow()  # after a promote, the alias follows at once


register_model()
