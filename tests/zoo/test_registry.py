import pytest
import timm
import torch
from safetensors.torch import save_file

import zoo
from zoo._registry import register_model


def test_register_refuses_timm_name():
    def resnet50(pretrained=False, **kwargs):  # noqa: D401 - a timm built-in name
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="resnet50"):
        register_model(resnet50)
    assert timm.models._registry._model_to_module["resnet50"] == "resnet"


def test_create_model_unknown_name():
    with pytest.raises(ValueError, match="unknown model name"):
        zoo.create_model("no_such_model_xyz")


def test_create_model_pretrained_without_file():
    name = zoo.list_models("test_*")[0]
    with pytest.raises(ValueError, match="checkpoint_path"):
        zoo.create_model(name, pretrained=True)


def test_checkpoint_path_loads_weights(tmp_path):
    name = zoo.list_models("test_*")[0]
    src = zoo.create_model(name)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = zoo.create_model(name, checkpoint_path=str(path))
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError):
        zoo.create_model(name, checkpoint_path=str(tmp_path / "missing.safetensors"))


def test_list_models_pattern():
    names = zoo.list_models()
    assert names == sorted(names)
    assert all(n.startswith("test_") for n in zoo.list_models("test_*"))
    assert zoo.list_models("zzz_nothing*") == []
