"""Fine-tuning a backbone's top layers with a trained head: a trial's last phase (``fine_tune_layers`` > 0).

A backbone run's trial first trains its head on features computed once (:mod:`sparktf.features`).
With ``fine_tune_layers`` N > 0 it then composes the backbone and that head into one model taking
uint8 pixels (:func:`sparktf.backbones.compose`), unfreezes the backbone's top N layers that hold
weights (:func:`unfreeze_top`; batch normalisation stays frozen, in inference mode, as Keras'
transfer-learning guide advises, so small batches do not wreck its statistics) and trains on the
prepared images at :data:`LEARNING_RATE_FACTOR` of the trial's learning rate, with the same
epochs, early stopping and learning-rate decay as the head. The images go through the backbone
in every epoch: minutes per trial where a frozen head takes seconds.

Fine-tuning never makes a trial worse as trials are ranked: when the fine-tuned model does not
beat the composed frozen one on the validation images (accuracy, then loss; :func:`improves`) or
diverges, the frozen weights are kept and the record says so. Either way the trial's saved model
is the composed one (``takes_pixels`` in the record), which the export registers as it is.
"""

from __future__ import annotations

import math
from typing import Any

LEARNING_RATE_FACTOR = 0.1  # the fine-tuning phase's step size, as a share of the trial's learning rate


def weighted_layers(model) -> list:
    """The layers holding weights that fine-tuning may unfreeze, bottom to top, through nested models.

    Batch normalisation is left out (it stays frozen); so are the nested models themselves (their
    layers are listed). On a feature extractor (:func:`sparktf.backbones.feature_extractor`) these
    are exactly the layers between the pixels and the features.
    """
    import keras

    found = []
    for layer in getattr(model, "layers", []):
        if isinstance(layer, keras.Model):
            found += weighted_layers(layer)
        elif layer.weights and not isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
    return found


def _every_layer(model):
    for layer in getattr(model, "layers", []):
        yield layer
        yield from _every_layer(layer)


def unfreeze_top(extractor, count: int) -> list[str]:
    """Freeze every layer of ``extractor``, then unfreeze its top ``count`` weighted layers; their names.

    Raises:
        ValueError: ``count`` is more than the extractor's weighted layers.
    """
    candidates = weighted_layers(extractor)
    if count > len(candidates):
        raise ValueError(f"fine_tune_layers {count} is more than the {len(candidates)} layers with weights this backbone has")
    for layer in _every_layer(extractor):
        if not hasattr(layer, "layers"):
            layer.trainable = False
    chosen = candidates[len(candidates) - count :] if count else []
    for layer in chosen:
        layer.trainable = True
    return [layer.name for layer in chosen]


def fine_tune(head, data: dict[str, Any], record: dict[str, Any], *, frozen: dict[str, float], callbacks: list):
    """The trial's fine-tuning phase: ``(composed model, metrics)``; details in ``record["fine_tune"]``.

    Args:
        head: the head trained on features (its weights carry over).
        data: the trial's data: ``images`` (the prepared arrays) and ``backbone`` (``model_uri``,
            ``model_sha256``) besides the features.
        record: the attempt's record (``params``, ``max_epochs``); gains ``fine_tune`` and the
            phase's epochs in ``epochs_run``.
        frozen: the head's metrics on the features (reported beside the fine-tuned ones).
        callbacks: early stopping and learning-rate decay, as for the head.

    Storage errors raise (no verdict on the trial); the phase's own divergence keeps the frozen weights.
    """
    from sparktf import backbones, models, registry, trials

    params, images = record["params"], data["images"]
    base = registry.load_verified_model(data["backbone"]["model_uri"], data["backbone"]["model_sha256"])
    composed = backbones.compose(base, head, name="transfer")
    unfrozen = unfreeze_top(composed.get_layer(f"{base.name}_features"), int(params["fine_tune_layers"]))  # compose's extractor
    learning_rate = float(params["learning_rate"]) * LEARNING_RATE_FACTOR
    composed.compile(
        optimizer=models.make_optimizer(params.get("optimizer", "adam"), learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    before = trials.evaluate(composed, images)
    kept_weights = composed.get_weights()
    history = composed.fit(
        images["x_train"],
        images["y_train"],
        batch_size=int(params["batch_size"]),
        epochs=record["max_epochs"],
        validation_data=(images["x_val"], images["y_val"]),
        callbacks=callbacks,
        verbose=0,
        shuffle=True,
    )
    losses = [float(v) for v in history.history.get("loss", [])]
    after = trials.evaluate(composed, images) if losses and all(math.isfinite(v) for v in losses) else None
    better = after is not None and (before is None or improves(after, before))
    if not better:
        composed.set_weights(kept_weights)
    record["epochs_run"] += len(losses)
    record["fine_tune"] = fine_tune_summary(
        unfrozen, learning_rate, len(losses), frozen=frozen, composed_frozen=before, fine_tuned=after, kept="fine_tuned" if better else "frozen"
    )
    record["takes_pixels"] = True
    return composed, (after if better else before) or frozen


def improves(after: dict[str, float], before: dict[str, float]) -> bool:
    """Whether the fine-tuned metrics beat the frozen ones as trials are ranked: validation accuracy, then validation loss."""
    return (after["val_accuracy"], -after["val_loss"]) > (before["val_accuracy"], -before["val_loss"])


def fine_tune_summary(
    unfrozen: list[str],
    learning_rate: float,
    epochs_run: int,
    *,
    frozen: dict[str, float],
    composed_frozen: dict[str, float] | None,
    fine_tuned: dict[str, float] | None,
    kept: str,
) -> dict[str, Any]:
    """What a trial's record says of its fine-tuning phase (pure)."""

    def accuracy(metrics: dict[str, float] | None) -> float | None:
        return None if metrics is None else round(float(metrics["val_accuracy"]), 6)

    return {
        "layers": unfrozen,
        "learning_rate": learning_rate,
        "epochs_run": epochs_run,
        "val_accuracy_head": accuracy(frozen),
        "val_accuracy_frozen": accuracy(composed_frozen),
        "val_accuracy_fine_tuned": accuracy(fine_tuned),
        "kept": kept,
    }
