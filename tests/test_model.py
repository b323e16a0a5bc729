"""Target-layer discovery (nested models, conv-logits heads), --layer resolution, output heads."""

import keras
import pytest

from biasscope.errors import BiasscopeError
from biasscope.model import choose_layer, find_layer, output_head, target_layers
from conftest import make_cnn


def _transfer_model(n_classes=3):
    base = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(64, 64, 3))
    return keras.Sequential([keras.Input((64, 64, 3)), base, keras.layers.GlobalAveragePooling2D(),
                             keras.layers.Dense(n_classes, activation="softmax")])


def test_automatic_layer_is_last_spatial_layer():
    assert choose_layer(make_cnn()).path == "last_conv"


def test_automatic_layer_found_inside_nested_transfer_model():
    m = _transfer_model()
    info = choose_layer(m)
    assert info.path == "mobilenetv2_1.00_64/out_relu"
    assert info.shape == (2, 2, 1280)


def test_conv_logits_head_and_1x1_maps_are_skipped():
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="features")(inp)
    x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="gap")(x)          # 1x1 map
    x = keras.layers.Conv2D(4, 1, name="conv_logits")(x)                             # conv logits
    x = keras.layers.Flatten()(x)
    out = keras.layers.Activation("softmax")(x)
    m = keras.Model(inp, out)
    assert choose_layer(m).path == "features"

    # a spatial 1x1 conv whose filters equal the outputs is skipped even at full resolution
    inp = keras.Input((16, 16, 3))
    f = keras.layers.Conv2D(8, 3, padding="same", name="features")(inp)
    logits_map = keras.layers.Conv2D(5, 1, name="class_maps")(f)
    act = keras.layers.ReLU(name="maps_relu")(logits_map)
    out = keras.layers.Softmax()(keras.layers.GlobalAveragePooling2D()(act))
    assert choose_layer(keras.Model(inp, out)).path == "features"


def test_model_without_spatial_layer_suggests_layer_option():
    m = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3, activation="softmax")])
    with pytest.raises(BiasscopeError, match="--layer"):
        choose_layer(m)


def test_find_layer_by_nested_path_plain_name_and_near_matches():
    m = _transfer_model()
    assert find_layer(m, "mobilenetv2_1.00_64/block_16_project").path == "mobilenetv2_1.00_64/block_16_project"
    assert find_layer(m, "block_16_project").shape[:2] == (2, 2)
    with pytest.raises(BiasscopeError, match="did you mean.*block_16_project"):
        find_layer(m, "block_16_projekt")
    with pytest.raises(BiasscopeError, match="neither \\(batch, H, W, C\\)"):
        find_layer(m, m.layers[-1].name)


def test_spatial_layers_lists_nested_layers_in_order():
    paths = [i.path for i in target_layers(_transfer_model())]
    assert paths[-1] == "mobilenetv2_1.00_64/out_relu"
    assert paths.index("mobilenetv2_1.00_64/Conv1") < paths.index("mobilenetv2_1.00_64/out_relu")


@pytest.mark.parametrize("build, kind, via, n_classes", [
    (lambda: make_cnn(3), "softmax", "activation", 3),
    (lambda: make_cnn(3, activation=None), "linear", "none", 3),
    (lambda: make_cnn(1, activation="sigmoid"), "sigmoid", "activation", 2),
    (lambda: keras.Sequential([make_cnn(3, activation=None), keras.layers.Softmax()]), "softmax", "call", 3),
    (lambda: _transfer_model(4), "softmax", "activation", 4),
])
def test_output_head(build, kind, via, n_classes):
    head = output_head(build())
    assert (head.kind, head.via, head.n_classes) == (kind, via, n_classes)
