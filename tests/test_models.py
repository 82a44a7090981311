"""Every registered model: logits, penultimate features, 32x32 and 64x64 inputs, checkpoint loading."""
import pytest
import torch

import common

FEATURE_DIMS = {"cnn_small": 128, "cnn6": 64, "cnn6x2": 128, "resnet18": 512, "resnet18_lbgat": 512,
                "preact_resnet18": 512, "wrn34_10": 640, "mobilenet_v3": 1280}


@pytest.mark.parametrize("name", sorted(common.MODELS))
@pytest.mark.parametrize("size", [32, 64])
def test_forward_shapes(name, size):
    model = common.build_model(name, 7).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        z = model(x)
        f, z2 = model(x, return_features=True)
    assert z.shape == (2, 7) and torch.equal(z, z2)
    assert f.shape == (2, FEATURE_DIMS[name]) == (2, model.feature_dim)


def test_resnet18_variants_final_map_size():
    maps = {}
    for name in ("resnet18", "resnet18_lbgat"):
        m = common.build_model(name, 10)
        m.layer4.register_forward_hook(lambda mod, i, o, name=name: maps.__setitem__(name, o.shape[-1]))
        m.eval()(torch.rand(1, 3, 32, 32))
    assert maps == {"resnet18": 4, "resnet18_lbgat": 8}


def test_wrn_loads_trades_checkpoint_with_sub_block1():
    model = common.build_model("wrn34_10", 10)
    assert not any(k.startswith("sub_block1") for k in model.state_dict())
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    state["module.sub_block1.layer.0.conv1.weight"] = torch.zeros(160, 16, 3, 3)  # what TRADES' files hold
    fresh = common.build_model("wrn34_10", 10)
    common.load_model_state(fresh, state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    state["module.unexpected.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError):  # otherwise strict
        common.load_model_state(fresh, state)


def test_unknown_model():
    with pytest.raises(common.UserError, match="unknown model"):
        common.build_model("vgg", 10)


@pytest.mark.parametrize("size", [32, 64])
def test_mobilenet_v3_shapes(size):
    torch.manual_seed(0)
    m = common.MobileNetV3(num_classes=7)
    x = torch.rand(2, 3, size, size)
    f, z = m(x, return_features=True)
    assert f.shape == (2, 1280) and z.shape == (2, 7) and m.feature_dim == 1280
    assert m.features[0][0].stride == (1, 1)
    assert m.features(x).shape[-1] == size // 16  # stem stride 1: total stride 16, not 32
    m.eval()
    with torch.no_grad():
        f, z = m(x, return_features=True)
        assert torch.equal(z, m.fc(f)) and torch.equal(z, m(x))


def test_mobilenet_v3_dropout_only_on_logits():
    torch.manual_seed(0)
    m = common.MobileNetV3(num_classes=5).train()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        f, z = m(x, return_features=True)
        assert torch.equal(f, m.embed(x))  # features are not dropped (deterministic per batch)
        assert not torch.allclose(z, m.fc(f))  # the logits are


def test_mobilenet_v3_matches_torchvision_except_stem():
    import torchvision
    torch.manual_seed(0)
    m = common.MobileNetV3(num_classes=5).eval()
    tv = torchvision.models.mobilenet_v3_large(num_classes=5).eval()
    tv.features[0][0].stride = (1, 1)
    tv.load_state_dict({k.replace("pre.", "classifier.").replace("fc.", "classifier.3."): v
                        for k, v in m.state_dict().items()})
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m(x), tv(x), atol=1e-6)


# ------------------------------------------------------------------------------ relation losses
