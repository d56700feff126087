"""Models "of a user's own", named by import path in the tests ("user_models:small_cnn")."""
import torch.nn as nn


def small_cnn(num_classes=10, input_shape=(1, 28, 28)):
    """A small CNN with in-place ReLUs, written as a user would, sized from the input shape it is given."""
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * (h // 2) * (w // 2), 16), nn.ReLU(inplace=True),
                         nn.Linear(16, num_classes))


def all_conv(num_classes=10, input_shape=(1, 28, 28)):
    """An all-convolutional classifier (a 1x1-conv head and global pooling, as NiN or SqueezeNet): no Linear."""
    c, h, w = input_shape
    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def takes_nothing():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


NOT_CALLABLE = 3


def not_a_module(num_classes=10):
    return "a string"


class TiedMLP(nn.Module):
    """Two hidden layers sharing one weight (tied) and an output layer tied to nothing."""

    def __init__(self, num_classes=10, input_shape=(1, 28, 28)):
        super().__init__()
        c, h, w = input_shape
        self.inp = nn.Linear(c * h * w, 16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.b.weight = self.a.weight
        self.out = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.inp(x.flatten(1)).relu()
        return self.out(self.b(self.a(x).relu()).relu())


def tied_mlp(num_classes=10, input_shape=(1, 28, 28)):
    return TiedMLP(num_classes, input_shape)


def weight_normed_mlp(num_classes=10, input_shape=(1, 28, 28)):
    """An MLP whose hidden layer is weight-normalized (its weight computed from weight_g and weight_v)."""
    from torch.nn.utils import parametrizations
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 16), nn.ReLU(),
                         parametrizations.weight_norm(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, num_classes))
