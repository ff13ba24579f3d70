"""The masked LM (BERT) on every attention path: padding, the MLM head on target positions only,
fixed target counts, sequences packed into rows, and what each layout compiles to."""

import pytest
import torch


@pytest.mark.parametrize("impl", ["flash", "sdpa"])
def test_bert_padding_changes_nothing_for_real_tokens(impl, tiny, tokens):
    model = tiny("bert", attention=impl).eval()
    short = tokens[:1, :15]
    padded = torch.cat([short, torch.zeros(1, 8, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 15), torch.zeros(1, 8)], dim=1).long()
    torch.testing.assert_close(model(padded, mask)[:, :15], model(short), rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["flash", "sdpa"])
def test_bert_loss_on_masked_positions_equals_the_loss_of_full_logits(impl, tiny, tokens):
    """The model packs real tokens once and runs its head only where targets are set: the loss and
    every gradient equal those computed from the full (B, N, V) logits (float64 with sdpa; the
    kernel's float32 path with flash, where only summation order differs)."""
    import torch.nn.functional as F
    model = tiny("bert", attention=impl, dropout=0.0, attn_dropout=0.0).train()
    if impl == "sdpa":
        model = model.double()
    tolerance = dict(rtol=1e-9, atol=1e-12) if impl == "sdpa" else dict(rtol=1e-4, atol=1e-6)
    mask = torch.ones_like(tokens)
    mask[0, 15:] = 0                                           # row 0 padded, row 1 full
    targets = torch.full_like(tokens, -100)
    targets[0, [1, 4, 9]] = tokens[0, [1, 4, 9]]
    targets[1, [0, 7, 20, 22]] = tokens[1, [0, 7, 20, 22]]
    loss = model(tokens, mask, targets=targets)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    logits = model(tokens, mask)
    reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    expected = torch.autograd.grad(reference, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, reference, **tolerance)
    for got, want in zip(grads, expected):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, **tolerance)


def test_masked_lm_flash_step_has_no_host_read(tiny, tokens):
    """No host read of the mask decides the flash path: with dynamo capturing data-dependent shapes
    the whole MLM step (unpad, blocks, head on the scored positions) is one graph, and its loss and
    gradients equal the uncompiled step's."""
    torch._dynamo.reset()
    model = tiny("bert", attention="flash", dropout=0.0, attn_dropout=0.0).train()
    mask = torch.ones_like(tokens)
    mask[0, 15:] = 0
    targets = torch.full_like(tokens, -100)
    targets[:, 3::5] = tokens[:, 3::5]
    parameters = [model.embed.weight, model.blocks[0].attn.qkv.weight]
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        loss = compiled(tokens, mask, targets=targets)
        grads = torch.autograd.grad(loss, parameters)
    expected_loss = model(tokens, mask, targets=targets)
    expected = torch.autograd.grad(expected_loss, parameters)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_bert_padded_layout_as_documents_equals_unpadding(tiny, tokens):
    """model.unpad=false (padding kept, each row's padding its own document) gives the real tokens
    the same logits, loss and gradients as packing them: row 0 padded, row 1 full (its padding
    document is empty)."""
    mask = torch.ones_like(tokens)
    mask[0, 15:] = 0
    targets = torch.full_like(tokens, -100)
    targets[:, 2::4] = tokens[:, 2::4]
    real = mask.bool()
    results = {}
    for unpad in (True, False):
        model = tiny("bert", attention="flash", unpad=unpad, dropout=0.0, attn_dropout=0.0).train()
        loss = model(tokens, mask, targets=targets)
        grads = torch.autograd.grad(loss, [model.embed.weight, model.blocks[0].attn.qkv.weight])
        results[unpad] = (model.eval()(tokens, mask)[real], loss, grads)
    torch.testing.assert_close(results[False][0], results[True][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[False][1], results[True][1], rtol=1e-5, atol=1e-6)
    for got, want in zip(results[False][2], results[True][2]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("max_targets, capture", [(None, True), (4, False)])
def test_bert_padded_layout_compiles_to_one_graph(tiny, tokens, max_targets, capture):
    """The padded flash layout compiles to one graph: with Bernoulli targets once the head's target
    selection is captured; with a fixed target count (max_targets) there is no data-dependent shape
    left, so without capturing any."""
    torch._dynamo.reset()
    model = tiny("bert", attention="flash", unpad=False, dropout=0.0, attn_dropout=0.0).train()
    mask = torch.ones_like(tokens)
    mask[1, 9:] = 0
    targets = torch.full_like(tokens, -100)
    targets[:, 1::6] = tokens[:, 1::6]
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=capture):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        loss = compiled(tokens, mask, targets=targets, max_targets=max_targets)
    torch.testing.assert_close(loss, model(tokens, mask, targets=targets), rtol=1e-5, atol=1e-6)


def test_bert_flash_with_a_mask_without_padding_equals_no_mask(tiny, tokens):
    model = tiny("bert", attention="flash").eval()
    torch.testing.assert_close(model(tokens, torch.ones_like(tokens)), model(tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention, unpad", [("flash", True), ("flash", False), ("sdpa", True),
                                              ("eager", True)])
def test_bert_fixed_target_count_gives_the_same_loss_and_gradients(tiny, tokens, attention, unpad):
    """max_targets (every row has at most that many targets): the head runs on B x K positions, and
    the loss and gradients equal the data-dependent selection's; a row with fewer targets than K
    (row 0, which is also padded) fills its slots with unscored positions."""
    mask = torch.ones_like(tokens)
    mask[0, 15:] = 0
    targets = torch.full_like(tokens, -100)
    targets[0, [2, 7, 11]] = tokens[0, [2, 7, 11]]
    targets[1, [1, 5, 9, 14, 20]] = tokens[1, [1, 5, 9, 14, 20]]
    model = tiny("bert", attention=attention, unpad=unpad, dropout=0.0, attn_dropout=0.0).train()
    parameters = [model.embed.weight, model.blocks[0].attn.qkv.weight, model.head_dense.weight]
    results = []
    for max_targets in (None, 5, 8):
        loss = model(tokens, mask, targets=targets, max_targets=max_targets)
        results.append((loss, torch.autograd.grad(loss, parameters)))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, results[0][1]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_bert_fixed_target_count_refuses_a_row_with_more_targets(tiny, tokens):
    model = tiny("bert", attention="flash", dropout=0.0, attn_dropout=0.0)
    targets = torch.full_like(tokens, -100)
    targets[1, :6] = tokens[1, :6]
    with pytest.raises(RuntimeError, match="more targets than max_targets"):
        model(tokens, torch.ones_like(tokens), targets=targets, max_targets=5)


def _packed_and_alone(tokens):
    """Four sequences (9, 6, 12 and 11 tokens) packed two to a row of 23 (row 0 padded: its
    padding is a document of its own; row 1 full), and the same four one to a padded row."""
    lengths, rows = [9, 6, 12, 11], [[0, 1], [2, 3]]
    sequences = [tokens.flatten()[7 * i:7 * i + n] for i, n in enumerate(lengths)]
    packed = torch.zeros_like(tokens)
    packed_mask, bounds = torch.zeros_like(tokens), []
    alone = torch.zeros(4, tokens.shape[1], dtype=tokens.dtype)
    alone_mask = torch.zeros_like(alone)
    for row, members in enumerate(rows):
        offset = 0
        for index in members:
            bounds.append(row * 23 + offset)
            packed[row, offset:offset + lengths[index]] = sequences[index]
            alone[index, :lengths[index]] = sequences[index]
            alone_mask[index, :lengths[index]] = 1
            offset += lengths[index]
        packed_mask[row, :offset] = 1
        if offset < 23:
            bounds.append(row * 23 + offset)
    cu_seqlens = torch.tensor(bounds + [46], dtype=torch.int32)
    # Targets: every third token of each sequence, the same tokens in both layouts.
    packed_targets, alone_targets = torch.full_like(packed, -100), torch.full_like(alone, -100)
    for row, members in enumerate(rows):
        offset = 0
        for index in members:
            picked = torch.arange(1, lengths[index], 3)
            packed_targets[row, offset + picked] = sequences[index][picked]
            alone_targets[index, picked] = sequences[index][picked]
            offset += lengths[index]
    return (packed, packed_mask, packed_targets, cu_seqlens), (alone, alone_mask, alone_targets)


@pytest.mark.parametrize("max_targets", [None, 8])
def test_bert_packed_rows_compute_what_each_sequence_computes_alone(tiny, tokens, max_targets):
    """Sequences packed into a row (data.mlm_pack_sequences) with cu_seqlens get the logits, loss and
    gradients they get one to a padded row: attention stays in each, positions restart at each."""
    (packed, packed_mask, packed_targets, cu_seqlens), (alone, alone_mask, alone_targets) = \
        _packed_and_alone(tokens)
    model = tiny("bert", attention="flash", dropout=0.0, attn_dropout=0.0).train()
    parameters = [model.embed.weight, model.positions.weight, model.blocks[0].attn.qkv.weight]
    loss = model(packed, packed_mask, targets=packed_targets, max_targets=max_targets,
                 cu_seqlens=cu_seqlens, max_seqlen=12)
    grads = torch.autograd.grad(loss, parameters)
    expected_loss = model(alone, alone_mask, targets=alone_targets, max_targets=max_targets)
    expected = torch.autograd.grad(expected_loss, parameters)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    model.eval()
    logits = model(packed, packed_mask, cu_seqlens=cu_seqlens, max_seqlen=12)[packed_mask.bool()]
    torch.testing.assert_close(logits, model(alone, alone_mask)[alone_mask.bool()], rtol=1e-5, atol=1e-5)


def test_bert_packed_rows_compile_to_one_graph_and_need_flash(tiny, tokens):
    torch._dynamo.reset()
    (packed, mask, targets, cu_seqlens), _ = _packed_and_alone(tokens)
    model = tiny("bert", attention="flash", dropout=0.0, attn_dropout=0.0).train()
    torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=False):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        loss = compiled(packed, mask, targets=targets, max_targets=8, cu_seqlens=cu_seqlens, max_seqlen=23)
    torch.testing.assert_close(loss, model(packed, mask, targets=targets, cu_seqlens=cu_seqlens,
                                           max_seqlen=23), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="packed sequences .* need attention=flash"):
        tiny("bert", attention="sdpa")(packed, mask, cu_seqlens=cu_seqlens, max_seqlen=23)
