"""A ``.keras`` file vetted without Keras, on the driver, before any actor or replica starts.

Keras's safe mode refuses Python code in a model file (a ``Lambda`` layer's lambda, a function
from an arbitrary module) and an object it cannot find, but only in the process that loads it: in
bulk jobs, pools and Serve that is an actor or a replica, whose failure reached the user as
hundreds of lines of Ray tracebacks. :func:`vet` reads the archive's ``config.json``
(milliseconds, no TensorFlow) and refuses the same things, and a card that contradicts the
model's input bands, input size or output channels, in one line naming the file
(:func:`segray.models.saving.vet` reads the file and calls it; so does every load). The actors'
safe-mode load stays the last word: this only says it sooner and plainly.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from segray.errors import ModelError
from segray.models.options import output_channels

if TYPE_CHECKING:
    from segray.models.card import ModelCard

#: Modules a model file's objects may come from.
TRUSTED_MODULES = ("keras", "segray")
#: segray's own serialisable layers (``segray>Name``); :mod:`segray.models.layers` registers them.
SEGRAY_OBJECTS = frozenset(
    {"MCDropout", "MaxUnpooling2D", "BilinearUpsampling", "BackbonePreprocess"}
)
#: Layers whose output has their input's channels: the output channels are those of a layer above.
KEEP_CHANNELS = frozenset(
    "UpSampling2D Resizing BilinearUpsampling Activation Cropping2D ZeroPadding2D Dropout "
    "MCDropout BatchNormalization Softmax".split()
)
#: Settings whose string value names a Keras function.
FUNCTION_KEYS = ("activation", "recurrent_activation")


def vet_file(data: bytes, card: ModelCard, model_uri: str, card_uri: str) -> None:
    """Refuse a model file (its bytes) holding anything safe mode would refuse, or whose card
    does not fit it: :class:`ModelError` naming the file, the layer and why."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise ModelError(f"{model_uri}: not a whole Keras model file ({exc})") from None
    found = list(refusals(config))
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ModelError(f"{model_uri}: refused: {found[0]}{more}")
    check_card(config, card, card_uri)


def refusals(node: Any, layer: str = "?") -> Iterator[str]:
    """Why safe mode would refuse each object of a model config (depth first)."""
    if isinstance(node, list):
        for item in node:
            yield from refusals(item, layer)
        return
    if not isinstance(node, dict):
        return
    inner = node.get("config")
    if "class_name" in node and isinstance(inner, dict) and isinstance(inner.get("name"), str):
        layer = inner["name"]
    kind, module = node.get("class_name"), node.get("module")
    if kind in ("Lambda", "__lambda__"):
        yield f"layer {layer!r} is a Lambda layer: Python code, which safe mode does not run"
        return
    if isinstance(module, str) and module.split(".")[0] not in TRUSTED_MODULES:
        what = f"{kind} {inner!r}" if isinstance(inner, str) else str(kind)
        yield f"layer {layer!r}: {what} from module {module!r}, which is neither Keras nor segray"
        return
    registered = node.get("registered_name")
    if isinstance(registered, str) and ">" in registered:
        package, _, name = registered.partition(">")
        if package != "segray" or name not in SEGRAY_OBJECTS:
            yield f"layer {layer!r}: custom object {registered!r}, which segray does not define"
            return
    for key, value in node.items():
        dotted = isinstance(value, str) and "." in value
        if key in FUNCTION_KEYS and dotted and value.split(".")[0] not in TRUSTED_MODULES:
            yield f"layer {layer!r}: {key} {value!r} is not a Keras function"
        else:
            yield from refusals(value, layer)


def check_card(config: dict[str, Any], card: ModelCard, source: str) -> None:
    """Refuse a card whose bands, input size or classes contradict the model config (where the
    config says them: its input layer, and an output layer with filters or units)."""
    body = config.get("config") if isinstance(config.get("config"), dict) else {}
    layers = [x for x in body.get("layers", []) if isinstance(x, dict)]
    for layer in layers:
        if layer.get("class_name") != "InputLayer":
            continue
        shape = (layer.get("config") or {}).get("batch_shape") or []
        if len(shape) == 4 and shape[-1] is not None and shape[-1] != card.channels:
            raise ModelError(
                f"{source}: input_shape has {card.channels} band(s) but the model takes {shape[-1]}"
            )
        size = [s for s in shape[1:3] if s is not None]
        if len(size) == 2 and tuple(size) != tuple(card.input_shape[:2]):
            raise ModelError(
                f"{source}: input_shape {list(card.input_shape[:2])} but the model takes {size}"
            )
    outputs = body.get("output_layers") or []
    if outputs and isinstance(outputs[0], str):
        outputs = [outputs]  # one output: [name, node, tensor]
    if len(outputs) != 1:
        return
    by_name = {(x.get("config") or {}).get("name"): x for x in layers}
    last = by_name.get(outputs[0][0]) or {}
    for _ in range(len(layers)):  # back through the layers that keep the channels
        if last.get("class_name") not in KEEP_CHANNELS:
            break
        last = by_name.get(_first_input(last)) or {}
    settings = last.get("config") or {}
    channels = settings.get("filters", settings.get("units"))
    if isinstance(channels, int) and channels != output_channels(card.num_classes):
        raise ModelError(
            f"{source}: num_classes {card.num_classes} does not fit the model, whose {channels} "
            f"output channel(s) mean {2 if channels == 1 else channels} classes"
        )


def _first_input(layer: dict[str, Any]) -> str | None:
    """The name of the layer that feeds ``layer``'s first input (Keras 3's functional config)."""
    for node in layer.get("inbound_nodes") or []:
        args = node.get("args") if isinstance(node, dict) else None
        for arg in args or []:
            history = (
                (arg.get("config") or {}).get("keras_history") if isinstance(arg, dict) else None
            )
            if history:
                return history[0]
    return None
