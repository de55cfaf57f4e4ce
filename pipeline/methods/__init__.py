"""Pretraining methods as plug-ins: the one list of their names, read without importing torch.

A trained method is one module, ``pipeline/methods/<name>.py``, holding the whole method: its
``NAME``, ``heads(build)`` (the modules it adds beside the encoder), ``objective(module, images,
view, generator)`` and the optional hooks (pictures, its own optimizers, per-epoch monitors, a
momentum ``TEACHER``). ``pipeline/methods/_contract.py`` states them as code and checks every
module when ``_registry`` imports it.

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
