"""The architecture specs: internal consistency of each family's data, and the config keys qconv
refuses rather than silently ignoring. (Each family's numbers are checked against transformers
and llama.cpp in test_runner, test_gguf_export, test_compressed_tensors and test_methods.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from qconv.arch import FAMILIES, config_from_dict
from qconv.errors import UnsupportedModel
from qconv.model.decoder import make_block

from conftest import TINY_ARCHS, tiny_hf_config


def test_every_family_has_a_tiny_test_model() -> None:
    assert set(FAMILIES) == set(TINY_ARCHS)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_spec_is_consistent(arch: str) -> None:
    """Groups partition the Linears in execution order; every source is a tensor of the block;
    GGUF names map back (experts: each merged tensor holds every expert's, in order)."""
    spec = FAMILIES[arch]
    assert [lin for g in spec.groups for lin in g.linears] == list(spec.linear_names)
    modules = {n.name for n in spec.norms} | set(spec.linear_names)
    assert all(g.source in modules for g in spec.groups)
    assert all((g.source_kind == "norm") == (g.source in {n.name for n in spec.norms}) for g in spec.groups)
    config = config_from_dict(tiny_hf_config(arch).to_dict())
    names = list(config.expected_shapes())
    merged = spec.gguf_tensors(config)
    assert sorted(n for hfs in merged.values() for n in hfs) == sorted(names)
    for g, hfs in merged.items():
        if len(hfs) == 1:
            assert spec.hf_name(g) == hfs[0] and spec.expert_index(hfs[0]) is None
        else:
            assert [spec.expert_index(n) for n in hfs] == list(range(config.num_experts))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_block_ops_stop_at_every_group(arch: str) -> None:
    """The runner's block produces one branch value per Linear group of the spec, and each is
    the input its group's first Linear sees in a plain forward."""
    config = config_from_dict(tiny_hf_config(arch).to_dict())
    torch.manual_seed(0)
    block = make_block(config, 0).eval()
    seen: dict[str, torch.Tensor] = {}
    for name in config.spec.linear_names:
        block.get_submodule(name).register_forward_pre_hook(lambda _m, a, name=name: seen.setdefault(name, a[0]))
    x = torch.randn(1, 5, config.hidden_size)
    cos = sin = torch.ones(5, config.head_dim)
    ops = block.ops(cos, sin, None, 0)
    branch = [op for op in ops if not op.residual]
    # a mixture of experts adds one: its router's and experts' shared (then routed) input
    assert len(branch) == len(config.spec.groups) + (config.spec.experts is not None)
    y = None
    with torch.no_grad():
        for op in ops:
            if op.residual:
                x = op.fn(x, y)
            else:
                y = op.fn(x, y)
                if branch.index(op) == len(config.spec.groups):  # the experts' input
                    continue
                group = config.spec.groups[branch.index(op)]
                seen.clear()
                block.get_submodule(group.linears[0])(y)
                assert torch.equal(seen[group.linears[0]], y)


@pytest.mark.parametrize("arch,overrides,message", [
    ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported for llama (supported: silu, gelu_pytorch_tanh)"),
    ("qwen2", {"use_sliding_window": True}, "sliding-window attention layers are not supported for qwen2"),
    ("qwen3", {"layer_types": ["sliding_attention", "full_attention"]}, "sliding-window attention layers"),
    ("llama", {"mlp_bias": True}, "mlp_bias=true is not supported"),
])
def test_unimplemented_config_keys_are_refused(arch: str, overrides: dict, message: str) -> None:
    raw = {**tiny_hf_config(arch).to_dict(), **overrides}
    with pytest.raises(UnsupportedModel, match=re.escape(message)):
        config_from_dict(raw)


def test_family_defaults_fill_absent_keys() -> None:
    """Qwen3's head_dim defaults to 128 in transformers, not hidden / heads."""
    raw = tiny_hf_config("qwen3", hidden_size=256).to_dict()
    del raw["head_dim"]
    config = config_from_dict(raw)
    assert config.head_dim == 128
    assert "head_dim" not in config.raw  # the user's config is kept as written


#: qconv's packages from the bottom up: each may import only those of a lower rank (the modules
#: at the top level of qconv, errors and atomic among them, are free for all).
LAYERS = {"core": 0, "arch": 1, "checkpoint": 2, "model": 3, "formats": 3, "quant": 4}


def test_packages_import_only_below() -> None:
    """No package imports one above (or beside) it: the shared types live at the bottom."""
    import ast

    root = Path(__file__).resolve().parents[1] / "qconv"
    wrong = []
    for package, rank in LAYERS.items():
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qconv."):
                    target = node.module.split(".")[1]
                    if target in LAYERS and target != package and LAYERS[target] >= rank:
                        wrong.append(f"{path.relative_to(root)} imports qconv.{target}")
    assert not wrong, wrong
