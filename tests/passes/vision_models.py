"""Tiny vision towers for the LayerNorm → RMSNorm and vision-rotation tests, exported with torch.onnx (dynamo).

``dinov2_vlm``: a random ``transformers.Dinov2Model`` (LayerScale on, LayerNorm γ/β and LayerScale λ randomised so
that folding them is actually exercised) followed by a LLaVA-style MLP projector, optionally with the tiny VLM's
token pooling in between. ``toy_encoder``: hand-written encoders for the structures the pass must handle or refuse
(post-LN, a LayerNorm at the stream's start).
"""

from __future__ import annotations

from pathlib import Path

WIDTH = 32
MLP = 128


def _torch():
    import torch

    return torch


def dinov2_vlm(seed: int = 0, projector: bool = True, pool: bool = False):
    torch = _torch()
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=MLP // WIDTH,
                          patch_size=4, image_size=16, layerscale_value=0.5, layer_norm_eps=1e-6, hidden_act="gelu")

    class Vision(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = Dinov2Model(config)
            self.multi_modal_projector = torch.nn.Sequential(
                torch.nn.Linear(WIDTH, 48), torch.nn.GELU(), torch.nn.Linear(48, 40)) if projector else None

        def forward(self, pixel_values):
            hidden = self.vision_tower(pixel_values=pixel_values).last_hidden_state
            if pool:  # CLS, then the 4x4 patch grid average-pooled 2x2 (the tiny VLM's TokenPool)
                b, _, c = hidden.shape
                grid = hidden[:, 1:].reshape(b, 4, 4, c).permute(0, 3, 1, 2)
                pooled = torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
                hidden = torch.cat([hidden[:, :1], pooled], dim=1)
            return self.multi_modal_projector(hidden) if projector else hidden

    model = Vision().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "lambda1" in name:
                param.add_(0.3 * torch.randn_like(param))
            elif name.endswith(("cls_token", "position_embeddings")) or name.endswith("bias"):
                param.add_(0.5 * torch.randn_like(param) + 0.2)  # non-zero channel means to centre away
    return model, torch.randn(1, 3, 16, 16)


def toy_encoder(kind: str, seed: int = 0):
    """``post_ln``: x = LN(x + f(x)) per block (BERT-like). ``ln_pre``: patch linear -> LN_pre -> pre-LN blocks."""
    torch = _torch()
    torch.manual_seed(seed)
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(WIDTH)
            self.fc1 = nn.Linear(WIDTH, MLP)
            self.fc2 = nn.Linear(MLP, WIDTH)

        def forward(self, x):
            if kind == "post_ln":
                return self.norm(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Linear(12, WIDTH)
            self.ln_pre = nn.LayerNorm(WIDTH)
            self.layers = nn.ModuleList([Block(), Block()])
            self.norm = nn.LayerNorm(WIDTH)
            self.head = nn.Linear(WIDTH, 24)

        def forward(self, patches):
            x = self.ln_pre(self.patch(patches))
            for block in self.layers:
                x = block(x)
            return self.head(self.norm(x))

    model = Encoder().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_pre" in name:
                param.add_(0.3 * torch.randn_like(param) + 0.1)
    return model, torch.randn(1, 9, 12)


def export(model, example, path: Path, input_name: str = "pixel_values") -> Path:
    torch = _torch()
    with torch.no_grad():
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[input_name],
                                    output_names=["image_embeds"], verbose=False)
    program.save(str(path))
    return path


#: The towers the tests share through the export cache (tests/conftest.py): name -> (model builder, input name).
TOWERS = {
    "dinov2": (lambda: dinov2_vlm(pool=True), "pixel_values"),  # CLS + 2x2 pooling -> projector
    "dinov2_pooled": (lambda: dinov2_vlm(projector=False, pool=True), "pixel_values"),
    "post_ln": (lambda: toy_encoder("post_ln"), "patches"),
    "ln_pre": (lambda: toy_encoder("ln_pre"), "patches"),
}


def export_tower(name: str, folder: Path) -> Path:
    """Export the tower ``name`` of ``TOWERS`` into ``folder``."""
    build, input_name = TOWERS[name]
    return export(*build(), folder / f"{name}.onnx", input_name)


def with_projector(model, hidden: int = 1024, out: int = 576, seed: int = 0):
    """``model`` (an onnx_ir vision graph with one [B, T, C] output) followed by a random LLaVA-style MLP projector
    ``linear_1 -> Gelu -> linear_2``, as the tiny VLM's vision.onnx has it (for graphs cut before the projector)."""
    import numpy as np
    import onnx_ir as ir

    from mqc.ir import add_initializer

    graph = model.graph
    feats = graph.outputs[0]
    width = feats.shape[-1]
    rng = np.random.default_rng(seed)
    x = feats
    nodes = []
    for name, (n_in, n_out) in (("linear_1", (width, hidden)), ("linear_2", (hidden, out))):
        w = add_initializer(graph, f"multi_modal_projector.{name}.weight",
                            (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32))
        b = add_initializer(graph, f"multi_modal_projector.{name}.bias", (0.1 * rng.standard_normal(n_out)).astype(np.float32))
        matmul = ir.node("MatMul", [x, w], name=f"multi_modal_projector.{name}/MatMul")
        add = ir.node("Add", [matmul.outputs[0], b], name=f"multi_modal_projector.{name}/Add")
        nodes += [matmul, add]
        x = add.outputs[0]
        if name == "linear_1":
            gelu = ir.node("Gelu", [x], name="multi_modal_projector.act")
            nodes.append(gelu)
            x = gelu.outputs[0]
    graph.extend(nodes)
    x.name, feats.name = feats.name, f"{feats.name}_features"
    x.dtype, x.shape = feats.dtype, ir.Shape([*feats.shape.dims[:-1], out])
    graph.outputs[0] = x
    return model
