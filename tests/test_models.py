"""The encoders accept reduced sequences with the same weights, and agree with open_clip at full length."""
import open_clip
import pytest
import torch

from sweep.models import MODELS, build_model, count_params, encode_image, encode_text, position_embedding_for_grid


@pytest.mark.parametrize("name", ["cpu-s", "cpu-m", "cpu-l"])
def test_full_length_encoders_match_open_clip(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    images = torch.randn(3, 3, 64, 64)
    text = open_clip.tokenize(["a red circle", "a large blue square sits on the left", "a"], context_length=32)
    with torch.no_grad():
        torch.testing.assert_close(encode_image(model, images), model.encode_image(images, normalize=True))
        torch.testing.assert_close(encode_text(model, text), model.encode_text(text, normalize=True))


def test_cpu_sizes_differ_clearly_in_parameter_count():
    vision = [count_params(build_model(n).visual) for n in ["cpu-s", "cpu-m", "cpu-l"]]
    total = [count_params(build_model(n)) for n in ["cpu-s", "cpu-m", "cpu-l"]]
    assert vision[1] > 2 * vision[0] and vision[2] > 2 * vision[1]
    assert total[0] < total[1] < total[2]


def test_paper_sizes_have_paper_shapes():
    assert MODELS["ViT-B-16"].image_tokens == 197 and MODELS["ViT-L-16"].image_tokens == 197
    assert MODELS["ViT-H-14"].image_tokens == 257
    assert all(spec.text_tokens == 32 for spec in MODELS.values())
    assert {spec.image_tokens for n, spec in MODELS.items() if n.startswith("cpu")} == {65}


def test_same_weights_serve_every_resolution_and_text_length():
    torch.manual_seed(0)
    model = build_model("cpu-s").eval()
    with torch.no_grad():
        for size in [16, 32, 48, 64]:
            assert encode_image(model, torch.rand(2, 3, size, size)).shape == (2, 64)
        full = open_clip.tokenize(["a small red dog"], context_length=32)
        short = open_clip.tokenize(["a small red dog"], context_length=8)
        # the causal mask means a short context changes nothing for a caption that fits in it
        torch.testing.assert_close(encode_text(model, full), encode_text(model, short))


def test_position_table_is_resized_not_cropped():
    torch.manual_seed(0)
    visual = build_model("cpu-s").visual
    pos = position_embedding_for_grid(visual, 4)
    assert pos.shape == (17, visual.positional_embedding.shape[1])
    torch.testing.assert_close(pos[0], visual.positional_embedding[0])
    # a table whose entries are their column: a 4x4 grid's columns sit at the centres of the 2-column bands they
    # cover (0.5, 2.5, 4.5, 6.5; half-pixel centres, the antialiasing filter pulls the edges in a little)
    with torch.no_grad():
        visual.positional_embedding[1:] = torch.arange(8.0).repeat(8)[:, None]
    columns = position_embedding_for_grid(visual, 4)[1:, 0].reshape(4, 4)
    torch.testing.assert_close(columns, torch.tensor([0.5, 2.5, 4.5, 6.5]).expand(4, 4), atol=0.06, rtol=0)
