"""The attention layers hand flash their fused qkv projection whole (``attention_qkv``): compiled,
the projection's gradient comes back in one piece, with no concatenation of three in the backward."""

import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd


def backward_ops(model, *args, **kwargs) -> set[str]:
    graphs = []
    backend = aot_autograd(fw_compiler=lambda graph, _: make_boxed_func(graph),
                           bw_compiler=lambda graph, _: graphs.append(graph) or make_boxed_func(graph))
    torch._dynamo.reset()
    torch.compile(model, backend=backend)(*args, **kwargs).backward()
    torch._dynamo.reset()
    return {str(node.target) for graph in graphs for node in graph.graph.nodes}


def test_flash_layers_backpropagate_into_the_fused_projection_without_a_concatenation(tiny, tokens):
    # GPT-2's layer; BERT's blocks are the same SelfAttention.
    model = tiny("gpt2", attention="flash", dropout=0.0, attn_dropout=0.0).train()
    targets = tokens.clone()
    ops = backward_ops(model, tokens, targets=targets)
    assert "flashtrain.flash_attention_qkv_backward.default" in ops
    assert not any("cat" in op for op in ops), sorted(op for op in ops if "cat" in op)
    # The same model with the views split (sdpa) does concatenate: the check can fail.
    split = tiny("gpt2", attention="sdpa", dropout=0.0, attn_dropout=0.0).train()
    assert any("cat" in op for op in backward_ops(split, tokens, targets=targets))
