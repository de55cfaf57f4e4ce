"""The augment stage: resolved policies with training-split statistics, a preview, a pool."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.augment import TRANSFORMS, resolve_policy
from pipeline.config import ConfigError, from_dict
from pipeline.stages import augment, download, split
from tests.conftest import REPO, params_for


@pytest.fixture
def tiny_config(workdir: Path, tiny_idx: Path):
    def make(**augment_params):
        params = params_for("idx", split={"label_fractions": [0.5, 1.0]})
        params["data"]["local_path"] = str(tiny_idx)
        params["augment"].update(augment_params)
        return from_dict(params)

    config = make()
    download.run(config)
    split.run(config)
    return make


def test_policy_json_holds_resolved_policies_and_training_split_statistics(tiny_config):
    document = augment.run(tiny_config())
    saved = json.loads(Path("data/augment/idx/policy.json").read_text())
    assert saved == document
    # params.yaml's named policies: pretraining's views, fine-tuning's, none, semi's weak / strong
    assert set(saved["policies"]) == {"ssl", "supervised", "none", "weak", "strong"}
    assert saved["policies"]["none"] == {}
    # Defaults are filled in: the supervised policy's erasing ratio was not written in params.yaml.
    assert saved["policies"]["supervised"]["random_erasing"]["ratio"] == [0.3, 3.3]
    images = np.load("data/prepared/idx/train_images.npy")
    train = np.load("data/splits/idx/train.npy")
    assert saved["mean"] == [round(images[train].mean() / 255, 6)]
    assert saved["mean"] != [round(images.mean() / 255, 6)]  # validation images are left out
    assert saved["image_size"] == [8, 8] and saved["channels"] == 1


def test_the_preview_shows_every_policy_and_is_the_same_every_time(tiny_config):
    config = tiny_config(preview_images=4, preview_views=3)
    augment.run(config)
    first = Path("data/augment/idx/preview.png").read_bytes()
    image = Image.open(io.BytesIO(first))
    zoomed = 8 * 3 + 2  # 8-pixel images zoomed 3x, 2-pixel gaps
    policies = len(config.augment.policies)  # each: the image and 3 views, 8 pixels apart
    assert image.size == (policies * 4 * zoomed + (policies - 1) * 8, 4 * zoomed + 14)
    augment.run(config)
    assert Path("data/augment/idx/preview.png").read_bytes() == first


def test_preview_images_are_the_first_of_each_class():
    labels = np.array([2, 0, 1, 0, 2, 1])
    chosen = augment.preview_images(labels, np.arange(6), 5)
    assert chosen.tolist() == [1, 2, 0, 3, 5]


def test_an_offline_pool_holds_augmented_copies_of_the_training_split(tiny_config):
    augment.run(tiny_config(offline_copies=2))
    pool = np.load("data/augment/idx/pool/images.npy")
    indices = np.load("data/augment/idx/pool/indices.npy")
    train = np.load("data/splits/idx/train.npy")
    originals = np.load("data/prepared/idx/train_images.npy")
    assert pool.dtype == np.uint8 and pool.shape == (2 * len(train), 8, 8, 1)
    np.testing.assert_array_equal(indices, np.tile(train, 2))
    changed = (pool != originals[indices]).reshape(len(pool), -1).any(axis=1)
    assert 0.3 < changed.mean() < 1.0  # supervised policy: most images change, some do not
    assert not np.array_equal(pool[: len(train)], pool[len(train) :])  # the two copies differ


def test_without_a_pool_only_its_manifest_is_written(tiny_config):
    augment.run(tiny_config())
    assert sorted(p.name for p in Path("data/augment/idx/pool").iterdir()) == ["manifest.json"]


def test_a_missing_split_names_the_stage_that_makes_it(workdir: Path, tiny_idx: Path):
    params = params_for("idx")
    params["data"]["local_path"] = str(tiny_idx)
    config = from_dict(params)
    download.run(config)
    with pytest.raises(Exception, match=r"data/splits/idx/train.npy.*run the split stage"):
        augment.run(config)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("ssl.sharpen", {"p": 0.5}, "unknown key augment.policies.ssl.sharpen"),
        ("ssl.hflip.p", 1.5, "ssl.hflip.p = 1.5 is not allowed: must be at most 1"),
        ("ssl.random_resized_crop.scale", [0.9, 0.2], "must be a [min, max] range with min <= max"),
        ("supervised.gaussian_blur", {"p": 0.5, "kernel_size": 4}, "must be an odd number"),
        ("supervised.rotation", {"p": 0.5}, "missing key augment.policies.supervised.rotation.deg"),
    ],
)
def test_bad_policies_are_schema_errors_naming_the_key(path, value, expected):
    params = params_for()
    *parents, last = path.split(".")
    node = params["augment"]["policies"]
    for key in parents:
        node = node[key]
    node[last] = value
    with pytest.raises(ConfigError) as err:
        from_dict(params)
    assert expected in str(err.value)


def test_offline_policy_must_name_a_policy():
    params = params_for()
    params["augment"]["offline_policy"] = "randaugment"
    with pytest.raises(ConfigError, match="augment.offline_policy = 'randaugment' is not a"):
        from_dict(params)


def test_the_json_schema_and_the_python_policy_checks_agree_on_options_and_defaults():
    schema = yaml.safe_load((REPO / "schemas/params.schema.yaml").read_text())
    transforms = schema["$defs"]["policy"]["properties"]
    assert set(transforms) == set(TRANSFORMS)
    for name, spec in transforms.items():
        options = spec["properties"]
        required = {key: 1 if key == "kernel_size" else 0.5 for key in spec["required"]}
        resolved = resolve_policy({name: required})[name]
        assert set(resolved) == set(options), name
        for option, rule in options.items():
            if "default" in rule:
                default = resolved[option]
                expected = rule["default"]
                assert np.allclose(default, expected, rtol=1e-6), f"{name}.{option}"
