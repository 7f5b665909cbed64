"""learn2learn's vision models: its parameter names and shapes (so its state
dicts load), the output shapes of the images they take, and DropBlock."""

import pytest
import torch

import fastmeta as l2l  # the way learn2learn code imports them
from fastmeta.vision.models import DropBlock

# Parameter and buffer names and shapes of learn2learn 0.2's models (a sample of each).
EXPECTED = {
    "CNN4": (
        lambda: l2l.vision.models.CNN4(5),
        {
            "features.0.conv.weight": (64, 3, 3, 3),
            "features.0.normalize.weight": (64,),
            "features.3.normalize.running_var": (64,),
            "classifier.weight": (5, 1600),
        },
        (2, 3, 84, 84),
    ),
    "OmniglotCNN": (
        lambda: l2l.vision.models.OmniglotCNN(5),
        {"base.0.conv.weight": (64, 1, 3, 3), "features.1.3.conv.bias": (64,), "classifier.weight": (5, 64)},
        (2, 1, 28, 28),
    ),
    "OmniglotFC": (
        lambda: l2l.vision.models.OmniglotFC(784, 5),
        {"features.1.0.linear.weight": (256, 784), "features.1.3.normalize.weight": (64,), "classifier.bias": (5,)},
        (3, 784),
    ),
    "ResNet12": (
        lambda: l2l.vision.models.ResNet12(5),
        {
            "features.layer1.0.conv1.weight": (64, 3, 3, 3),
            "features.layer1.0.downsample.0.weight": (64, 3, 1, 1),
            "features.layer3.0.conv3.weight": (320, 320, 3, 3),
            "features.layer4.0.bn3.running_mean": (640,),
            "classifier.weight": (5, 640),
        },
        (2, 3, 84, 84),
    ),
    "WRN28": (
        lambda: l2l.vision.models.WRN28(5),
        {
            "features.conv1.weight": (16, 3, 3, 3),
            "features.layer1.0.shortcut.0.weight": (160, 16, 1, 1),
            "features.layer3.3.conv2.weight": (640, 640, 3, 3),
            "features.bn1.weight": (640,),
            "classifier.weight": (5, 640),
        },
        (1, 3, 84, 84),
    ),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_learn2learn_names_shapes_and_outputs(name):
    build, keys, input_shape = EXPECTED[name]
    torch.manual_seed(0)
    model = build().eval()
    state = model.state_dict()
    for key, shape in keys.items():
        assert tuple(state[key].shape) == shape, key
    with torch.no_grad():
        assert model(torch.rand(input_shape)).shape == (input_shape[0], 5)
    build().load_state_dict(state)


def test_initialisation_follows_learn2learn():
    torch.manual_seed(0)
    cnn = l2l.vision.models.CNN4(5)
    assert torch.equal(cnn.classifier.bias, torch.zeros(5)) and cnn.features[0].conv.bias.abs().sum() == 0
    assert 0 <= cnn.features[0].normalize.weight.min() and cnn.features[0].normalize.weight.max() <= 1
    fc = l2l.vision.models.OmniglotFC(784, 5)
    assert fc.classifier.weight.abs().max() <= 0.02  # truncated at two standard deviations of 0.01


def test_drop_block_mask_covers_a_block_from_each_seed():
    g = torch.Generator().manual_seed(0)
    b, H, W = 3, 7, 6
    seeds = (torch.rand(2, 4, H - b + 1, W - b + 1, generator=g) < 0.1).float()
    want = torch.ones(2, 4, H, W)
    for n, c, i, j in seeds.nonzero().tolist():
        want[n, c, i : i + b, j : j + b] = 0
    assert torch.equal(DropBlock(b).keep_mask(seeds), want)
    block = DropBlock(b)
    x = torch.rand(2, 4, H, W)
    assert torch.equal(block.eval()(x, 0.5), x)
    out = block.train()(x, 0.2)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] * (x.numel() / kept.sum()))
