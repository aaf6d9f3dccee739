import pytest
from mqc.passes.canonicalize import FuseNormsPass, UpgradeOpsetPass

from mqc.ir import load_model
from mqc.model_map import build_model_map


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_map_finds_every_role_and_norm(tiny_models, family):
    model = load_model(tiny_models[family] / "decoder.onnx")
    UpgradeOpsetPass()(model)
    FuseNormsPass()(model)
    layers = 2
    model_map = build_model_map(model)
    roles = model_map.summary()["roles"]
    for role in ("q", "k", "v", "o", "gate", "up", "down"):
        assert roles[role] == layers, (role, roles)
    assert roles["lm_head"] == 1
    assert all(lin.layer in (0, 1) for lin in model_map.linears if lin.role != "lm_head")
    assert model_map.summary()["norms"]["rmsnorm"] == 2 * layers + 1
    assert len(model_map.residual_adds) == 2 * layers
    readers = {n.name: {r.role for r in n.readers} for n in model_map.norms}
    assert {"q", "k", "v"} in readers.values() and {"gate", "up"} in readers.values()
    if family == "qwen2":
        assert all(lin.bias is not None for lin in model_map.by_role("q", "k", "v"))
