"""Import a model the package did not train into the registry, as a new version of a named model.

Two sources: a stock ``keras.applications`` network (``--application InceptionV3``) with the
``.weights.h5`` file the user saved and uploaded (nothing is downloaded: the network is built with
``weights=None`` and given that file), or a user's own ``.keras`` file. Labels are the packaged
ImageNet class names or a label map the user uploaded (JSON list/dict, or one label per line).

Checks before anything is registered (:mod:`sparktf.applications`): the artifact, as saved, loads
in Keras safe mode with no Lambda layer; it takes one uint8 image input of fixed size and gives one
row of scores per image; the label map has exactly one label per output; the weights fit the
architecture. A refusal is the job's *result* (``{"registered": false, "refused": "<why>"}``, exit
code 0, nothing written to the registry), so Airflow does not retry a decision that cannot change;
the DAG's ``report`` task fails the run with that message.

The version's ``metadata.json`` records the input shape, channels, ``resize_policy``
(``center_crop`` for photos), the label names, the sha256s of the artifact, the uploaded file and
the label map, and where they came from. ``--promote`` also makes it the champion (the registry's
pointer move). A retried run (same ``--source-run``) reuses the version it already registered for
the same request (source, the uploads' sha256s, labels); a changed upload is registered anew.

Usage::

    spark-submit --py-files sparktf.zip jobs/register_model.py \\
        --models-uri s3://bucket/ws/models/ --model-name inception-v3 \\
        --source keras_application --application InceptionV3 \\
        --weights-uri s3://bucket/uploads/inception_v3.weights.h5 --labels imagenet --promote true \\
        --source-run manual__2026-11-24T10:00:00+00:00 --registered-at 2026-11-24T10:00:00+00:00
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

import sparktf
from sparktf import applications, executor, job, registry, storage
from sparktf.applications import RegistrationRefused

log = job.log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-uri", required=True, help="S3 prefix of the model registry")
    parser.add_argument("--model-name", required=True, help="registered model name (new or existing)")
    parser.add_argument("--source", required=True, choices=applications.SOURCES)
    parser.add_argument("--application", default="", help="keras.applications network (source keras_application)")
    parser.add_argument("--weights-uri", default="", help="S3 URI of its .weights.h5 file (source keras_application)")
    parser.add_argument("--model-uri", default="", help="S3 URI of a .keras file (source keras_file)")
    parser.add_argument("--labels", default="imagenet", choices=applications.LABEL_SOURCES)
    parser.add_argument("--label-map-uri", default="", help="S3 URI of the label map (labels label_map)")
    parser.add_argument(
        "--resize-policy",
        default="center_crop",
        choices=applications.RESIZE_POLICIES,
        help="how inference brings images to the input size (center_crop for photos)",
    )
    parser.add_argument("--promote", type=job.parse_bool, default=False, help="make the new version the champion (true/false)")
    parser.add_argument("--source-run", default="", help="id of the Airflow run registering it (retries reuse its version)")
    parser.add_argument("--registered-at", default="", help="when (ISO 8601, from the caller; recorded in the metadata)")
    parser.add_argument("--result-uri", default=None, help="S3 URI for the job's JSON summary")
    return parser.parse_args(argv)


def request_of(args: argparse.Namespace) -> dict[str, Any]:
    """The registration request, as :func:`sparktf.applications.check_request` takes it."""
    return {
        "model_name": args.model_name,
        "source": args.source,
        "application": args.application,
        "weights_uri": args.weights_uri,
        "model_uri": args.model_uri,
        "labels": args.labels,
        "label_map_uri": args.label_map_uri,
        "resize_policy": args.resize_policy,
    }


def read_labels(args: argparse.Namespace, s3=None) -> tuple[list[str], dict[str, Any]]:
    """The label names and where they came from."""
    if args.labels == "imagenet":
        return applications.imagenet_labels(), {"kind": "imagenet", "file": f"sparktf/{applications.IMAGENET_INDEX_FILE}"}
    try:
        data = storage.read_bytes(args.label_map_uri, s3)
    except storage.ObjectNotFound:
        raise RegistrationRefused(f"the label map {args.label_map_uri} does not exist") from None
    return applications.parse_label_map(data), {"kind": "label_map", "uri": args.label_map_uri, "sha256": storage.sha256_hex(data)}


def _download(uri: str, path: str, what: str, s3=None) -> str:
    try:
        return storage.download_file(uri, path, s3)
    except storage.ObjectNotFound:
        raise RegistrationRefused(f"the {what} {uri} does not exist") from None


def build_artifact(args: argparse.Namespace, tmp: str, labels: list[str]) -> tuple[str, dict[str, Any], Any]:
    """Build (or fetch) the ``.keras`` file to register.

    Returns:
        ``(local path, source record, the scores of the in-memory model on the probe batch or None)``.
    """
    if args.source == "keras_application":
        spec = applications.application(args.application)
        applications.check_labels(labels, applications.IMAGENET_CLASSES)  # before a large download
        weights_path = os.path.join(tmp, "uploaded" + applications.WEIGHTS_SUFFIX)
        weights_sha = _download(args.weights_uri, weights_path, "weights file")
        model = applications.build_application(spec.name, weights_path)
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        reference = applications.probe(model, spec.input_shape, applications.IMAGENET_CLASSES)
        source = {
            "kind": "keras_application",
            "application": spec.name,
            "weights_uri": args.weights_uri,
            "weights_sha256": weights_sha,
            "built_with": "keras.applications.%s(weights=None) + load_weights" % spec.name,
            "preprocessing": (
                "Rescaling(1/127.5, offset=-1) layer in front (pixels to [-1, 1])"
                if spec.preprocessing == "inception"
                else "the network's own layers"
            ),
        }
        return path, source, reference
    path = os.path.join(tmp, "model.keras")
    sha = _download(args.model_uri, path, "model file")
    return path, {"kind": "keras_file", "model_uri": args.model_uri, "model_sha256": sha}, None


def register(args: argparse.Namespace) -> dict[str, Any]:
    """Check and register; raises :class:`RegistrationRefused` with the reason, registering nothing."""
    import numpy as np

    problems = applications.check_request(request_of(args))
    if problems:
        raise RegistrationRefused("; ".join(problems))
    labels, labels_source = read_labels(args)
    with tempfile.TemporaryDirectory() as tmp:
        path, source, reference = build_artifact(args, tmp, labels)
        served = applications.load_safely(path)  # exactly as inference will load it
        input_shape, num_classes = applications.describe_model(served)
        applications.check_labels(labels, num_classes)
        scores = applications.probe(served, input_shape, num_classes)
        if reference is not None and not np.allclose(scores, reference, rtol=1e-4, atol=1e-6):
            raise RegistrationRefused(
                "the saved model scores differently from the model that was built: it does not survive a save and a safe-mode load"
            )
        metadata = applications.version_metadata(
            input_shape=input_shape,
            label_names=labels,
            resize_policy=args.resize_policy,
            source=source,
            labels=labels_source,
            input_dtype=str(served.inputs[0].dtype),
            source_run=args.source_run or None,
            registered_at=args.registered_at or None,
            code_version=sparktf.code_version(),
        )
        del served
        return registry.write_version(args.models_uri, args.model_name, model_path=path, metadata=metadata)


def _sha256_or_none(uri: str, s3=None) -> str | None:
    try:
        return storage.stream_sha256(uri, s3) if uri else None
    except storage.ObjectNotFound:
        return None


def request_fields(source: dict[str, Any], labels: dict[str, Any], resize_policy: str | None) -> dict[str, Any]:
    """What a registration was made from, flat: the model's source, its uploads' sha256s, the labels."""
    return {
        "source": source.get("kind"),
        "application": source.get("application"),
        "weights_uri": source.get("weights_uri"),
        "weights_sha256": source.get("weights_sha256"),
        "model_uri": source.get("model_uri"),
        "model_sha256": source.get("model_sha256"),
        "labels": labels.get("kind"),
        "label_map_uri": labels.get("uri"),
        "label_map_sha256": labels.get("sha256"),
        "resize_policy": resize_policy,
    }


def asked_fields(args: argparse.Namespace, s3=None) -> dict[str, Any]:
    """:func:`request_fields` of this request, with the uploads' current sha256s (streamed)."""
    if args.source == "keras_application":
        source = {
            "kind": args.source,
            "application": args.application,
            "weights_uri": args.weights_uri,
            "weights_sha256": _sha256_or_none(args.weights_uri, s3),
        }
    else:
        source = {"kind": args.source, "model_uri": args.model_uri, "model_sha256": _sha256_or_none(args.model_uri, s3)}
    labels = {"kind": args.labels}
    if args.labels == "label_map":
        labels.update(uri=args.label_map_uri, sha256=_sha256_or_none(args.label_map_uri, s3))
    return request_fields(source, labels, args.resize_policy)


def request_differences(metadata: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """The fields in which a registered version's request differs from ``asked`` (pure)."""
    recorded = request_fields(metadata.get("source") or {}, metadata.get("labels") or {}, metadata.get("resize_policy"))
    return [key for key in asked if recorded.get(key) != asked[key]]


def reusable_version(args: argparse.Namespace, s3=None) -> dict[str, Any] | None:
    """The version this run (``--source-run``) already registered for the same request (source,
    uploads' sha256s, labels), with its artifact checked; None when there is none. A version of the
    run made from other inputs (an upload replaced between attempts) is never reused for this one."""
    if not args.source_run:
        return None
    mine = [m for m in registry.list_versions(args.models_uri, args.model_name, s3) if m.get("source_run") == args.source_run]
    if not mine:
        return None
    asked = asked_fields(args, s3)
    for metadata in reversed(mine):
        if not request_differences(metadata, asked):
            registry.verify_artifact(metadata["model_uri"], metadata["model_sha256"], s3)
            return metadata
    log.warning(
        "model %s: run %s registered v%s from another request (differs in %s); registering this one anew",
        args.model_name,
        args.source_run,
        mine[-1]["version"],
        request_differences(mine[-1], asked),
    )
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    executor.pin_threads(int(os.environ.get("SPARKTF_EXPORT_THREADS", "2")))
    metadata = reusable_version(args)
    reused = metadata is not None
    if not reused:
        try:
            metadata = register(args)
        except RegistrationRefused as refused:
            log.error("model %s not registered: %s", args.model_name, refused)
            return {"model_name": args.model_name, "registered": False, "refused": str(refused), "source": args.source, "promoted": False}
    promoted, promotion_reason = False, "not requested (promote=false)"
    if args.promote:
        decision = registry.make_champion(
            args.models_uri, args.model_name, metadata, reason="registered with promote=true", source_run=args.source_run or None
        )
        promoted, promotion_reason = decision.promoted, decision.reason
    current = registry.read_champion(args.models_uri, args.model_name)
    log.info("model %s v%s registered (reused=%s, promoted=%s)", args.model_name, metadata["version"], reused, promoted)
    return {
        "model_name": args.model_name,
        "registered": True,
        "version": metadata["version"],
        "uri": metadata["uri"],
        "model_uri": metadata["model_uri"],
        "model_sha256": metadata["model_sha256"],
        "input_shape": metadata["input_shape"],
        "resize_policy": metadata.get("resize_policy"),
        "num_classes": len(metadata["label_names"]),
        "labels_sample": metadata["label_names"][:5],
        "source": metadata.get("source"),
        "promoted": promoted,
        "promotion_reason": promotion_reason,
        "reused_version": reused,
        "champion_version": current["version"] if current else None,
    }


def main(argv: list[str] | None = None) -> int:
    return job.run_driver_job("register_model", run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
