"""Every image strategy keeps exactly the tokens it promises, in the shape it promises."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sweep.models import build_model, encode_image
from sweep.strategies.image import IMAGE_STRATEGIES, reduce_images, square_counts

REDUCING = ["random", "grid", "block", "resize"]


def blocks_input_lengths(model, images, keep):
    """Sequence length seen by every transformer block of the vision tower during one forward."""
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
             for blk in model.visual.transformer.resblocks]
    with torch.no_grad():
        encode_image(model, images, keep)
    for h in hooks:
        h.remove()
    return seen


@pytest.fixture(scope="module")
def cpu_model():
    torch.manual_seed(0)
    return build_model("cpu-s").eval()


@pytest.mark.parametrize("strategy", REDUCING)
def test_transformer_blocks_see_exactly_image_tokens_for_every_allowed_count(cpu_model, strategy):
    images = torch.rand(3, 3, 64, 64)
    allowed = IMAGE_STRATEGIES[strategy].allowed_tokens(8)
    assert 17 in allowed and 65 in allowed
    for tokens in allowed:
        reduced, keep = reduce_images(images, strategy, tokens, 8, torch.Generator().manual_seed(tokens))
        seen = blocks_input_lengths(cpu_model, reduced, keep)
        assert seen == [tokens] * len(cpu_model.visual.transformer.resblocks), (strategy, tokens)


def test_none_keeps_the_full_sequence(cpu_model):
    images = torch.rand(2, 3, 64, 64)
    reduced, keep = reduce_images(images, "none", 65, 8, torch.Generator())
    assert keep is None and reduced is images
    assert blocks_input_lengths(cpu_model, reduced, keep) == [65, 65]


def test_allowed_counts_are_square_patch_counts_plus_class_token():
    assert square_counts(8) == [2, 5, 10, 17, 26, 37, 50, 65]
    assert square_counts(14)[-6:] == [82, 101, 122, 145, 170, 197]
    for name in ["grid", "block", "resize"]:
        assert IMAGE_STRATEGIES[name].allowed_tokens(8) == square_counts(8)
    assert IMAGE_STRATEGIES["random"].allowed_tokens(8) == list(range(2, 66))
    assert IMAGE_STRATEGIES["none"].allowed_tokens(8) == [65]


@settings(max_examples=60, deadline=None)
@given(grid=st.integers(2, 16), data=st.data(), batch=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_every_masking_strategy_keeps_k_distinct_in_grid_patches(grid, data, batch, seed):
    strategy = data.draw(st.sampled_from(["random", "grid", "block"]))
    tokens = data.draw(st.sampled_from(IMAGE_STRATEGIES[strategy].allowed_tokens(grid)))
    images = torch.zeros(batch, 3, grid * 4, grid * 4)
    _, keep = reduce_images(images, strategy, tokens, 4, torch.Generator().manual_seed(seed))
    assert keep.shape == (batch, tokens - 1)
    for row in keep.tolist():
        assert len(set(row)) == tokens - 1
        assert all(0 <= p < grid * grid for p in row)


@settings(max_examples=40, deadline=None)
@given(grid=st.integers(2, 16), data=st.data(), seed=st.integers(0, 2**31))
def test_grid_keeps_an_evenly_spaced_lattice(grid, data, seed):
    tokens = data.draw(st.sampled_from(square_counts(grid)))
    side = math.isqrt(tokens - 1)
    _, keep = reduce_images(torch.zeros(4, 3, grid, grid), "grid", tokens, 1, torch.Generator().manual_seed(seed))
    spacing = grid / side
    for row in keep.tolist():
        rows = sorted({p // grid for p in row})
        cols = sorted({p % grid for p in row})
        assert len(rows) == side and len(cols) == side
        assert set(row) == {r * grid + c for r in rows for c in cols}  # a full lattice: every row x every column
        for lines in (rows, cols):
            gaps = {b - a for a, b in zip(lines, lines[1:])}
            assert gaps <= {math.floor(spacing), math.ceil(spacing)}, (lines, spacing)


@settings(max_examples=40, deadline=None)
@given(grid=st.integers(2, 16), data=st.data(), seed=st.integers(0, 2**31))
def test_block_keeps_one_contiguous_square(grid, data, seed):
    tokens = data.draw(st.sampled_from(square_counts(grid)))
    side = math.isqrt(tokens - 1)
    _, keep = reduce_images(torch.zeros(4, 3, grid, grid), "block", tokens, 1, torch.Generator().manual_seed(seed))
    for row in keep.tolist():
        r0, c0 = min(p // grid for p in row), min(p % grid for p in row)
        assert set(row) == {(r0 + i) * grid + c0 + j for i in range(side) for j in range(side)}


def test_random_draws_a_different_subset_per_sample():
    _, keep = reduce_images(torch.zeros(16, 3, 64, 64), "random", 17, 8, torch.Generator().manual_seed(0))
    assert len({tuple(row) for row in keep.tolist()}) == 16


def test_grid_and_block_positions_vary_per_sample():
    for strategy in ["grid", "block"]:
        _, keep = reduce_images(torch.zeros(32, 3, 64, 64), strategy, 17, 8, torch.Generator().manual_seed(0))
        assert len({tuple(row) for row in keep.tolist()}) > 1, strategy


def test_masks_are_reproducible_from_the_generator_seed():
    for strategy in ["random", "grid", "block"]:
        a = reduce_images(torch.zeros(4, 3, 64, 64), strategy, 17, 8, torch.Generator().manual_seed(3))[1]
        b = reduce_images(torch.zeros(4, 3, 64, 64), strategy, 17, 8, torch.Generator().manual_seed(3))[1]
        assert torch.equal(a, b)


@pytest.mark.parametrize("tokens,size", [(50, 56), (37, 48), (26, 40), (17, 32), (10, 24), (5, 16), (65, 64)])
def test_resize_shrinks_the_image_to_the_patch_grid_of_the_token_count(tokens, size):
    reduced, keep = reduce_images(torch.rand(2, 3, 64, 64), "resize", tokens, 8, torch.Generator())
    assert keep is None and reduced.shape == (2, 3, size, size)


def test_paper_resolution_resize_gives_the_papers_token_counts():
    # 224 px, patch 16: 160/112/96/80/64 px -> 101/50/37/26/17 tokens
    for tokens, size in [(101, 160), (50, 112), (37, 96), (26, 80), (17, 64)]:
        reduced, _ = reduce_images(torch.rand(1, 3, 224, 224), "resize", tokens, 16, torch.Generator())
        assert reduced.shape[-1] == size


@settings(max_examples=30, deadline=None)
@given(strategy=st.sampled_from(["random", "grid", "block", "resize", "none"]), ranks=st.sampled_from([1, 2, 4]),
       share=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_a_batch_split_over_ranks_gets_the_masks_of_the_whole_batch(strategy, ranks, share, seed):
    images = torch.rand(ranks * share, 3, 64, 64)
    tokens = 17 if strategy != "none" else 65
    whole_images, whole_keep = reduce_images(images, strategy, tokens, 8, torch.Generator().manual_seed(seed))
    for rank in range(ranks):
        rows = slice(rank * share, (rank + 1) * share)
        got_images, keep = reduce_images(images[rows], strategy, tokens, 8, torch.Generator().manual_seed(seed), rows,
                                         ranks * share)
        assert torch.allclose(got_images, whole_images[rows])
        assert (keep is None) == (whole_keep is None)
        if keep is not None:
            assert torch.equal(keep, whole_keep[rows])


def test_grid_stays_inside_the_patch_grid_for_a_draw_next_to_one():
    # seed 17 draws 1 - 2^-24 for this row of a 2^21 batch: in float32 its last line rounded up to 8, patch 65 of 64
    images = torch.zeros(1, 3, 64, 64)
    _, keep = reduce_images(images, "grid", 17, 8, torch.Generator().manual_seed(17),
                            rows=slice(1321408, 1321409), batch_size=2**21)
    assert keep.max() < 64 and keep.unique().numel() == 16


@settings(max_examples=20, deadline=None)
@given(full=st.integers(2, 16), data=st.data())
def test_resize_trains_every_entry_of_the_full_length_position_table(full, data):
    # the fine-tune at full length starts from the whole table: an entry no reduced grid reads keeps its initial value
    from types import SimpleNamespace

    from sweep.models import position_embedding_for_grid

    grid = data.draw(st.integers(1, full - 1))
    visual = SimpleNamespace(grid_size=(full, full), positional_embedding=torch.randn(full * full + 1, 4,
                                                                                      requires_grad=True))
    (position_embedding_for_grid(visual, grid) * torch.randn(grid * grid + 1, 4)).sum().backward()
    assert (visual.positional_embedding.grad.abs().sum(-1) > 0).all()
