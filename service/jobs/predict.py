"""Batch prediction with a job's model, on inputs in the job's own record format: what a producer
would send to its topic, decoded by the same codec as in training (workers.kafka.codecs)."""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from service.core.errors import InvalidRequest
from service.jobs.model_export import LoadedModel, ModelUnavailable
from service.jobs.schemas import Prediction
from workers.errors import RecordRejected
from workers.kafka.codecs import decode_features
from workers.kafka.records import JsonFormat
from workers.spec import JobSpec

# Inputs run through the model this many at a time: bounds the activations held at once
# (preact_resnet18 on 3x32x32 needs about 1 MB per example) whatever the request's size.
PREDICT_BATCH = 256


class InvalidInput(InvalidRequest):
    """One input cannot be read in the job's record format; ``field`` is ``inputs[i]``."""


def predict(loaded: LoadedModel, spec: JobSpec, inputs: Sequence[Any]) -> list[Prediction]:
    """The predicted class and the softmax probabilities of each input, in order.

    Inputs are in the job's record format: for ``json``, a record's value as parsed JSON (an
    object with ``x``; its ``y`` is optional and ignored) or ``x`` alone (a number or nested
    array); for ``raw`` and ``image``, the record's bytes in base64. Every input is decoded
    before any is run, so a bad one raises InvalidInput (field ``inputs[i]``, the codec's reason)
    and nothing is computed.
    """
    features = [_features(i, value, spec) for i, value in enumerate(inputs)]
    predictions: list[Prediction] = []
    with torch.inference_mode():
        for start in range(0, len(features), PREDICT_BATCH):
            x = torch.from_numpy(np.stack(features[start:start + PREDICT_BATCH]))
            predictions += _predictions(loaded, spec, x)
    return predictions


def _predictions(loaded: LoadedModel, spec: JobSpec, x: torch.Tensor) -> list[Prediction]:
    logits = loaded.module(x)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(x), spec.codec.num_classes):
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelUnavailable(f"model {spec.model.name!r} returned {got} for {len(x)} inputs, not "
                               f"[{len(x)}, {spec.codec.num_classes}] logits")
    probabilities = torch.softmax(logits.float(), dim=1)  # float32 at least, whatever the model's dtype
    labels = probabilities.argmax(dim=1)
    return [Prediction(label=int(label), probabilities=row)
            for label, row in zip(labels.tolist(), probabilities.tolist())]


def _features(i: int, value: Any, spec: JobSpec) -> np.ndarray:
    """Input ``i`` decoded by the job's codec; InvalidInput naming it otherwise."""
    try:
        return decode_features(_record_value(value, spec), spec.codec)
    except RecordRejected as exc:
        raise InvalidInput(f"inputs[{i}]: {exc.reason}", field=f"inputs[{i}]") from exc
    except ValueError as exc:  # the input is not in the format's transport form (JSON, base64)
        raise InvalidInput(f"inputs[{i}]: {exc}", field=f"inputs[{i}]") from exc


def _record_value(value: Any, spec: JobSpec) -> bytes:
    """The record value an input stands for (what the codec decodes); ValueError if it is not
    in the form the format takes over JSON."""
    if isinstance(spec.codec.format, JsonFormat):
        if isinstance(value, dict):
            return _json_bytes(value)
        if isinstance(value, (list, int, float)) and not isinstance(value, bool):
            return _json_bytes({"x": value})
        raise ValueError(f"expected a JSON object with 'x' (or the features as a number or array), "
                         f"got {type(value).__name__}")
    if not isinstance(value, str):
        raise ValueError(f"expected the record's bytes as a base64 string, got {type(value).__name__}")
    # Checked before decoding: base64 is 4/3 of the bytes, so a longer string decodes to a value
    # the codec would refuse anyway.
    if len(value) > 4 * math.ceil(spec.codec.max_record_bytes / 3) + 4:
        raise ValueError(f"value exceeds max_record_bytes={spec.codec.max_record_bytes}")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not valid base64: {exc}") from exc


def _json_bytes(value: Any) -> bytes:
    # NaN and infinity pass through as JSON's non-standard literals, so the codec rejects them
    # as non-finite features, as it would on the topic.
    try:
        return json.dumps(value).encode()
    except (TypeError, ValueError, RecursionError) as exc:  # not JSON data, or nested past the recursion limit
        raise ValueError(f"not a JSON record value: {type(exc).__name__}") from exc
