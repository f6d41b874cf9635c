"""Save small models with segray 0.1.0's flat layout (commit 38d8823), plus reference logits."""

import sys

import keras
import numpy as np

from segray import modelio, models

keras.utils.set_random_seed(7)
out = sys.argv[1]
x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
specs = {
    "bayesian-segnet": dict(base_filters=4, depth=2, dropout_units=1),
    "fcn32s": dict(base_filters=2, fc_filters=8),
}
for name, opts in specs.items():
    m = models.build_model(name, 3, (32, 32, 3), **opts)
    models.set_monte_carlo(m, False)
    card = modelio.ModelCard(
        name=name,
        num_classes=3,
        input_shape=(32, 32, 3),
        options=opts,
        class_names=["background", "building", "road"],
        input_multiple=32,
    )
    folder = f"{out}/{name}"
    modelio.save_model(m, card, folder)
    np.save(f"{folder}/input.npy", x)
    np.save(f"{folder}/logits.npy", np.asarray(m.predict_on_batch(x)))
    print(name, m.count_params())
