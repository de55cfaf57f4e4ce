"""Pretraining methods as plug-ins: the one list of their names, read without importing torch.

A trained method is one module, ``pipeline/methods/<name>.py``, holding the whole method:

- ``NAME``: its name in params.yaml (``pretrain.methods``, ``pretrain.<name>``, ``finetune.inits``);
- ``heads(dim, options, width, in_channels, image_size)``: the modules it adds to the encoder, by
  attribute name (``head``, ``decoder``), built in this order so a seed gives the same weights;
- ``objective(module, images, view, generator)``: ``(loss, features, probe_rows)`` for a batch of
  uint8 ``images`` whose first augmented ``view`` the generic module has already drawn;
- optionally ``pictures(module, images, count, seed)``: uint8 image grids saved next to the
  encoder (``<name>.npy``) and shown in the report under ``PICTURES_CAPTION``; ``SAMPLES``
  names the grid of the model's own samples, which the report shows beside the other
  generative models';
- optionally, for a method with several optimizers (the GAN): ``configure_optimizers(module)``
  and ``training_step(module, images, labels, generator)``, which steps them itself (Lightning's
  manual optimization) and returns the loss to report as ``train_loss``;
- optionally ``epoch_end(module)``: extra per-epoch monitors (a dict of floats) for the row of
  the curves CSV, and ``CURVES``: the per-epoch columns the report plots for the method (its
  training step records them with ``module.track(name=value)``).

The generic Lightning module (pipeline.models.pretrain.PretrainModule) builds the encoder, the
augmentation, the online probe and the monitors, and delegates the rest to the method's module.
The names are the modules found in this package (listed, not imported: no torch here), so a
method's module is its registration: the schema, the CLI, the Snakemake wildcards and
``pipeline.methods._registry`` (which imports them all for the Lightning module) read the list.
Adding a method is its module plus its params and schema sections. Modules whose names start
with ``_`` are helpers, not methods.
"""

import pkgutil

#: Methods that train the encoder with a self-supervised objective: the modules of this package.
TRAINED: tuple[str, ...] = tuple(
    sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
)
#: Encoders the study compares against, made without an objective (pipeline/stages/pretrain.py):
#: the untrained initialization, the raw pixels and PCA fitted in closed form.
REFERENCES: tuple[str, ...] = ("scratch", "pixels", "pca")
#: Every name pretrain.methods accepts, in the order the CLI lists them.
NAMES: tuple[str, ...] = ("scratch", "pixels", *TRAINED, "pca")
#: Inits with no weights to train: their features are the input itself. They are feature
#: baselines (finetune.baselines), run in the frozen-encoder modes only.
FEATURE_BASELINES: tuple[str, ...] = ("pixels",)
