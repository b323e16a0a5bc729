"""`scan` on every keras.applications architecture (weights=None), bare and as a nested transfer model."""

import keras
import numpy as np
import pytest

import biasscope

ARCHS = {  # name -> input size giving a final feature map larger than 1x1
    "Xception": 96, "ResNet50": 64, "MobileNetV2": 64, "MobileNetV3Small": 64, "EfficientNetB0": 64,
    "DenseNet121": 64, "InceptionV3": 139, "VGG16": 64, "ConvNeXtTiny": 64,
}
EXPECTED_LAYER = {  # the conventional Grad-CAM layer of each architecture
    "Xception": "block14_sepconv2_act", "ResNet50": "conv5_block3_out", "MobileNetV2": "out_relu",
    "EfficientNetB0": "top_activation", "DenseNet121": "relu", "InceptionV3": "mixed10",
    "VGG16": "block5_pool",
}


def _check(scan, n_images, size):
    assert len(scan.table) == n_images
    h, w = scan.heatmaps.shape[1:]
    assert h > 1 and w > 1 and h <= size // 8
    assert scan.meta["timings"]["traces"] == 1
    assert np.isfinite(scan.table["confidence"]).all()
    inside = scan.table["inside_frac"].to_numpy()
    all_zero = scan.table["cam_max"].to_numpy() == 0
    np.testing.assert_array_equal(np.asarray(scan.heatmaps).max(axis=(1, 2)), np.where(all_zero, 0, 1))
    # random weights can give an all-zero CAM; exactly those rows have no inside_frac
    np.testing.assert_array_equal(np.isnan(inside), all_zero)
    assert ((inside[~all_zero] >= 0) & (inside[~all_zero] <= 1)).all()


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_bare_architecture(arch, image_set, tmp_path):
    keras.utils.set_random_seed(0)
    size = ARCHS[arch]
    model = getattr(keras.applications, arch)(weights=None, input_shape=(size, size, 3), classes=3)
    s = biasscope.scan(model, image_set, out=tmp_path / "o", batch_size=6, limit=6, progress=False)
    if arch in EXPECTED_LAYER:
        assert s.meta["layer"] == EXPECTED_LAYER[arch]
    _check(s, 6, size)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_nested_transfer_architecture(arch, image_set, tmp_path):
    keras.utils.set_random_seed(0)
    size = ARCHS[arch]
    base = getattr(keras.applications, arch)(weights=None, include_top=False, input_shape=(size, size, 3))
    model = keras.Sequential([keras.Input((size, size, 3)), base, keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3, activation="softmax")])
    path = tmp_path / "transfer.keras"
    model.save(path)
    s = biasscope.scan(path, image_set, out=tmp_path / "o", batch_size=6, limit=6, progress=False)
    assert s.meta["layer"].startswith(base.name + "/")
    if arch in EXPECTED_LAYER:
        assert s.meta["layer"] == f"{base.name}/{EXPECTED_LAYER[arch]}"
    _check(s, 6, size)
